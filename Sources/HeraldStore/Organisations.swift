import Foundation
import HeraldCore
import PostgresNIO

/// A tenant of Herald.
public struct Organisation: Sendable, Equatable {
    public var id: UUID
    public var slug: String
    public var name: String
    public var defaultLocale: String
    public var defaultTimezone: String
    /// Most notifications per user, per category, per minute; nil when unlimited.
    public var throttlePerMinute: Int?
    /// Most notifications per user per minute across all categories; nil when unlimited.
    public var userThrottlePerMinute: Int?
    /// The sender of the organisation's email (Herald's default when nil), its display name, and Reply-To.
    public var emailFrom: String?
    public var emailFromName: String?
    public var emailReplyTo: String?
    /// When digests go: the local hour (0–23) and, for weekly ones, the ISO weekday (1–7).
    public var digestHour: Int
    public var digestWeekday: Int
    /// How many days events and everything recorded about them are kept (the `retention` job).
    public var retentionDays: Int
    /// The inactivity rule (off by default).
    public var inactivity: InactivityRule
    public var createdAt: Date
    public var updatedAt: Date
}

/// The inactivity rule of an organisation: after `days` without engagement a warning, `graceDays`
/// later without engagement its email subscriptions to non-critical categories are switched off.
public struct InactivityRule: Sendable, Equatable {
    public var enabled: Bool
    public var days: Int
    public var graceDays: Int

    public init(enabled: Bool, days: Int, graceDays: Int) {
        self.enabled = enabled
        self.days = days
        self.graceDays = graceDays
    }
}

/// A change to the inactivity rule; nil leaves a field as it is.
public struct InactivityChange: Sendable, Equatable {
    public var enabled: Bool?
    public var days: Int?
    public var graceDays: Int?

    public init(enabled: Bool? = nil, days: Int? = nil, graceDays: Int? = nil) {
        self.enabled = enabled
        self.days = days
        self.graceDays = graceDays
    }
}

extension Database {
    /// Creates an organisation with its built-in roles, in one transaction under its own context.
    /// `then` runs in the same transaction (e.g. to create the first owner), so a failure there
    /// leaves no organisation behind.
    public func createOrganisation(
        slug: String, name: String, defaultLocale: String = "en", defaultTimezone: String = "UTC", requestID: String? = nil,
        then: (TenantTransaction) async throws -> Void = { _ in }
    ) async throws -> Organisation {
        let id = UUID()
        return try await withTenant(id, requestID: requestID) { tx in
            try await tx.query(
                """
                INSERT INTO organisations (id, slug, name, default_locale, default_timezone)
                VALUES (\(id), \(slug), \(name), \(defaultLocale), \(defaultTimezone))
                """)
            try await tx.ensureBuiltinRoles()
            try await tx.ensureSystemJobs()
            try await tx.audit(
                action: "organisation.create", targetType: "organisation", targetID: id.lowercased,
                before: nil, after: .object(["slug": .string(slug)]))
            try await then(tx)
            return try await tx.organisation()
        }
    }

    /// Every organisation id the owner role can see (the owner's slug policy allows it).
    /// Used by `herald migrate` to bring built-in roles up to date in each organisation.
    public func allOrganisationIDs() async throws -> [UUID] {
        var ids: [UUID] = []
        let rows = try await client.query("SELECT id FROM organisations ORDER BY created_at", logger: logger)
        for try await id in rows.decode(UUID.self) { ids.append(id) }
        return ids
    }
}

extension TenantTransaction {
    /// The current organisation.
    public func organisation() async throws -> Organisation {
        let rows = try await query(
            """
            SELECT id, slug, name, default_locale, default_timezone, (settings->>'throttle_per_minute')::int,
                   settings->>'email_from', settings->>'email_from_name', settings->>'email_reply_to', created_at, updated_at,
                   (settings->>'user_throttle_per_minute')::int, digest_hour::int, digest_weekday::int, retention_days,
                   inactivity_enabled, inactivity_days, inactivity_grace_days
            FROM organisations WHERE id = \(organisationID)
            """)
        guard let row = rows.first else { throw StoreError.notFound("organisation") }
        let (
            id, slug, name, locale, timezone, throttle, from, fromName, replyTo, created, updated, userThrottle, digestHour, digestWeekday,
            retentionDays, inactivityEnabled, inactivityDays, inactivityGraceDays
        ) =
            try row.decode(
                (UUID, String, String, String, String, Int?, String?, String?, String?, Date, Date, Int?, Int, Int, Int, Bool, Int, Int)
                    .self)
        return Organisation(
            id: id, slug: slug, name: name, defaultLocale: locale, defaultTimezone: timezone, throttlePerMinute: throttle,
            userThrottlePerMinute: userThrottle, emailFrom: from, emailFromName: fromName, emailReplyTo: replyTo, digestHour: digestHour,
            digestWeekday: digestWeekday, retentionDays: retentionDays,
            inactivity: InactivityRule(enabled: inactivityEnabled, days: inactivityDays, graceDays: inactivityGraceDays),
            createdAt: created,
            updatedAt: updated)
    }

    /// Sets the email sender settings given; an empty string clears one, nil leaves it.
    public func setEmailIdentity(from: String?, fromName: String?, replyTo: String?) async throws {
        try await query(
            """
            UPDATE organisations SET settings = jsonb_strip_nulls(settings || jsonb_build_object(
                'email_from', CASE WHEN \(from)::text IS NULL THEN settings->'email_from' ELSE to_jsonb(nullif(\(from)::text, '')) END,
                'email_from_name', CASE WHEN \(fromName)::text IS NULL THEN settings->'email_from_name' ELSE to_jsonb(nullif(\(fromName)::text, '')) END,
                'email_reply_to', CASE WHEN \(replyTo)::text IS NULL THEN settings->'email_reply_to' ELSE to_jsonb(nullif(\(replyTo)::text, '')) END)),
                updated_at = now()
            WHERE id = \(organisationID)
            """)
    }

    /// Changes the fields given; nil leaves a field as it is.
    public func updateOrganisation(
        name: String?, defaultLocale: String?, defaultTimezone: String?, digestHour: Int? = nil, digestWeekday: Int? = nil,
        retentionDays: Int? = nil, inactivity: InactivityChange = InactivityChange()
    ) async throws -> Organisation {
        let zoneBefore = try await query("SELECT default_timezone FROM organisations WHERE id = \(organisationID)").first?
            .decode(String.self, table: "organisations")
        let rows = try await query(
            """
            UPDATE organisations SET
                name = coalesce(\(name), name),
                default_locale = coalesce(\(defaultLocale), default_locale),
                default_timezone = coalesce(\(defaultTimezone), default_timezone),
                digest_hour = coalesce(\(digestHour)::smallint, digest_hour),
                digest_weekday = coalesce(\(digestWeekday)::smallint, digest_weekday),
                retention_days = coalesce(\(retentionDays)::integer, retention_days),
                inactivity_enabled = coalesce(\(inactivity.enabled)::boolean, inactivity_enabled),
                inactivity_days = coalesce(\(inactivity.days)::integer, inactivity_days),
                inactivity_grace_days = coalesce(\(inactivity.graceDays)::integer, inactivity_grace_days),
                updated_at = now()
            WHERE id = \(organisationID)
            RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("organisation") }
        // Jobs on cron follow the organisation's zone: their next run moves with it.
        if let defaultTimezone, defaultTimezone != zoneBefore { try await rescheduleJobs(now: Date()) }
        return try await organisation()
    }

    /// Creates the built-in roles if missing and sets their permissions to what this build defines.
    public func ensureBuiltinRoles() async throws {
        for role in BuiltinRole.allCases {
            let rows = try await query(
                """
                INSERT INTO roles (organisation_id, key, name, description, builtin)
                VALUES (\(organisationID), \(role.rawValue), \(role.name), \(role.summary), true)
                ON CONFLICT (organisation_id, key) DO UPDATE SET builtin = true, name = excluded.name, description = excluded.description
                RETURNING id
                """)
            let roleID = try rows[0].decode(UUID.self)
            try await setRolePermissions(roleID, role.permissions)
        }
    }
}

/// An organisation's own limits, set by the operator; nil: the instance's default.
public struct RateLimitSettings: Sendable, Equatable, Codable {
    public var requestsPerSecond: Double?
    public var eventsPerSecond: Double?

    public init(requestsPerSecond: Double? = nil, eventsPerSecond: Double? = nil) {
        self.requestsPerSecond = requestsPerSecond
        self.eventsPerSecond = eventsPerSecond
    }

    enum CodingKeys: String, CodingKey {
        case requestsPerSecond = "requests_per_second", eventsPerSecond = "events_per_second"
    }
}

extension RateLimitSettings: StoredDocument {}

extension TenantTransaction {
    /// The organisation's own request limits (issue 12), set by the operator.
    public func rateLimitSettings() async throws -> RateLimitSettings {
        try await query(
            "SELECT coalesce(settings->'rate_limits', '{}'::jsonb) FROM organisations WHERE id = \(organisationID)"
        ).first?.decode(RateLimitSettings.self) ?? RateLimitSettings()
    }

    /// Sets the organisation's own request limits; nil fields fall back to the instance's defaults.
    public func setRateLimits(_ limits: RateLimitSettings) async throws {
        try await query(
            "UPDATE organisations SET settings = settings || jsonb_build_object('rate_limits', \(limits)::jsonb), updated_at = now() WHERE id = \(organisationID)"
        )
    }
}
