import Foundation
import HeraldCore
import PostgresNIO

/// A webhook or chat endpoint of an organisation.
public struct Endpoint: Sendable, Equatable {
    public var id: UUID
    public var channel: NotificationChannel
    /// `standard` (Standard Webhooks) for webhooks; `slack` or `mattermost` for chat.
    public var format: String
    public var name: String
    public var url: String
    /// Notification type keys this endpoint takes; empty = every type.
    public var eventTypes: [String]
    public var enabled: Bool
    public var disabledReason: String?
    /// `whsec_…`; nil for chat.
    public var secret: String?
    /// The secret before the last rotation, still signing until `previousSecretExpiresAt`.
    public var previousSecret: String?
    public var previousSecretExpiresAt: Date?
    public var createdAt: Date
    public var updatedAt: Date

    /// The secrets that sign a message sent at `now`: the current one, and the previous one
    /// during a rotation's overlap.
    public func signingSecrets(at now: Date) -> [String] {
        guard let secret else { return [] }
        guard let previousSecret, let until = previousSecretExpiresAt, until > now else { return [secret] }
        return [secret, previousSecret]
    }
}

/// The fields of an endpoint as created or changed.
public struct EndpointFields: Sendable {
    public var name: String?
    public var url: String?
    public var eventTypes: [String]?
    public var enabled: Bool?

    public init(name: String? = nil, url: String? = nil, eventTypes: [String]? = nil, enabled: Bool? = nil) {
        self.name = name
        self.url = url
        self.eventTypes = eventTypes
        self.enabled = enabled
    }
}

extension TenantTransaction {
    public func createEndpoint(channel: NotificationChannel, format: String, name: String, url: String, eventTypes: [String],
                               secret: String?) async throws -> Endpoint {
        let id = UUID()
        try await query(
            """
            INSERT INTO endpoints (organisation_id, id, channel, format, name, url, event_types, secret)
            VALUES (\(organisationID), \(id), \(channel.rawValue), \(format), \(name), \(url), \(eventTypes)::text[], \(secret))
            """)
        return try await endpoint(id)
    }

    public func endpoint(_ id: UUID) async throws -> Endpoint {
        guard let row = try await query("SELECT \(unescaped: endpointColumns) FROM endpoints WHERE id = \(id)").first else {
            throw StoreError.notFound
        }
        return try decodeEndpoint(row)
    }

    /// Endpoints oldest first.
    public func endpoints(limit: Int, after cursor: PageCursor?) async throws -> Page<Endpoint> {
        let rows = try await query(
            """
            SELECT \(unescaped: endpointColumns) FROM endpoints
            WHERE \(cursor?.micros)::bigint IS NULL
               OR (created_at, id) > ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id))
            ORDER BY created_at, id
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeEndpoint), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Changes the fields given. Enabling an endpoint clears the reason it was disabled.
    public func updateEndpoint(_ id: UUID, _ fields: EndpointFields) async throws -> Endpoint {
        let rows = try await query(
            """
            UPDATE endpoints SET
                name = coalesce(\(fields.name), name), url = coalesce(\(fields.url), url),
                event_types = coalesce(\(fields.eventTypes)::text[], event_types),
                enabled = coalesce(\(fields.enabled)::boolean, enabled),
                disabled_reason = CASE WHEN \(fields.enabled)::boolean THEN NULL ELSE disabled_reason END,
                updated_at = now()
            WHERE id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound }
        return try await endpoint(id)
    }

    public func deleteEndpoint(_ id: UUID) async throws {
        guard try await !query("DELETE FROM endpoints WHERE id = \(id) RETURNING id").isEmpty else { throw StoreError.notFound }
    }

    /// Replaces a webhook endpoint's secret; the old one keeps signing until `overlapUntil`.
    public func rotateEndpointSecret(_ id: UUID, newSecret: String, overlapUntil: Date) async throws -> Endpoint {
        let rows = try await query(
            """
            UPDATE endpoints SET previous_secret = secret, previous_secret_expires_at = \(overlapUntil), secret = \(newSecret), updated_at = now()
            WHERE id = \(id) AND channel = 'webhook' RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound }
        return try await endpoint(id)
    }

    /// Switches an endpoint off (a receiver answered 410 Gone), saying why.
    public func disableEndpoint(_ id: UUID, reason: String) async throws {
        try await query("UPDATE endpoints SET enabled = false, disabled_reason = \(reason), updated_at = now() WHERE id = \(id) AND enabled")
    }

    /// The enabled endpoints that take notifications of `typeKey`, by channel.
    func endpointTargets(typeKey: String) async throws -> [NotificationChannel: [EndpointTarget]] {
        var targets: [NotificationChannel: [EndpointTarget]] = [:]
        for row in try await query(
            """
            SELECT channel, id, url FROM endpoints
            WHERE enabled AND (event_types = '{}' OR \(typeKey) = ANY(event_types))
            ORDER BY created_at, id
            """) {
            let (channel, id, url) = try row.decode((String, UUID, String).self)
            guard let channel = NotificationChannel(rawValue: channel) else { continue }
            targets[channel, default: []].append(EndpointTarget(id: id, url: url))
        }
        return targets
    }
}

private let endpointColumns = """
    id, channel, format, name, url, event_types, enabled, disabled_reason, secret, previous_secret, previous_secret_expires_at,
    created_at, updated_at
    """

func decodeEndpoint(_ row: PostgresRow) throws -> Endpoint {
    let (id, channel, format, name, url, types, enabled, reason, secret, previous, previousUntil, created, updated) =
        try row.decode((UUID, String, String, String, String, [String], Bool, String?, String?, String?, Date?, Date, Date).self)
    return Endpoint(id: id, channel: NotificationChannel(rawValue: channel) ?? .webhook, format: format, name: name, url: url,
                    eventTypes: types, enabled: enabled, disabledReason: reason, secret: secret, previousSecret: previous,
                    previousSecretExpiresAt: previousUntil, createdAt: created, updatedAt: updated)
}
