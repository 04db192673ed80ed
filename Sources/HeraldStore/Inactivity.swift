import Foundation
import HeraldCore
import PostgresNIO

// The inactivity rule (issue 11, migration 0014): engagement is recorded on the user, the
// `inactivity` job warns users who have not engaged for the organisation's period and switches
// off the email of those who did not engage in the grace period after the warning.

/// A user the inactivity rule is about to warn or switch off.
public struct InactivityCandidate: Sendable, Equatable {
    public var userID: UUID
    public var email: String
    public var displayName: String
    public var lastEngagedAt: Date
}

/// Engagement is written at most once per this many seconds per user.
let engagementGranularity: TimeInterval = 3600

extension TenantTransaction {
    /// Records that `userID` engaged at `now` (a tracked click, a login, a feed read, a "keep me
    /// subscribed" link): at most one write an hour per user, and a pending warning is withdrawn.
    /// When the transaction was entered for this user (a request), the entry has read their
    /// engagement, and a read within the hour with no warning pending writes nothing.
    public func recordEngagement(of userID: UUID, at now: Date) async throws {
        let since = now.addingTimeInterval(-engagementGranularity)
        if case .user(userID, let row?) = entry, !row.warned, row.lastEngagedAt >= since { return }
        try await query(
            """
            UPDATE users SET last_engaged_at = \(now), inactivity_warned_at = NULL
            WHERE organisation_id = \(organisationID) AND id = \(userID)
              AND (last_engaged_at < \(since) OR inactivity_warned_at IS NOT NULL)
            """)
    }

    /// Active users with an address who have not engaged for `rule.days` by `now` and have not been
    /// warned since (nor switched off since their last engagement), oldest engagement first, after `after`.
    public func usersToWarn(_ rule: InactivityRule, now: Date, after: PageCursor?, limit: Int) async throws -> [InactivityCandidate] {
        try await query(
            """
            SELECT id, email, display_name, last_engaged_at FROM users
            WHERE organisation_id = \(organisationID) AND active AND email <> ''
              AND last_engaged_at < \(now) - make_interval(days => \(rule.days)::integer)
              AND inactivity_warned_at IS NULL
              AND (inactivity_switched_off_at IS NULL OR last_engaged_at > inactivity_switched_off_at)
              AND (\(after?.micros)::bigint IS NULL
                   OR (last_engaged_at, id) > ('epoch'::timestamptz + \(after?.micros) * interval '1 microsecond', \(after?.id)))
            ORDER BY last_engaged_at, id
            LIMIT \(limit)
            """
        ).map(decodeCandidate)
    }

    /// Marks the warning sent, unless the user engaged meanwhile; false then.
    public func markWarned(_ userID: UUID, rule: InactivityRule, now: Date) async throws -> Bool {
        try await !query(
            """
            UPDATE users SET inactivity_warned_at = \(now)
            WHERE organisation_id = \(organisationID) AND id = \(userID) AND inactivity_warned_at IS NULL
              AND last_engaged_at < \(now) - make_interval(days => \(rule.days)::integer)
            RETURNING id
            """
        ).isEmpty
    }

    /// Active users warned at least `rule.graceDays` before `now` who have not engaged since.
    public func usersToSwitchOff(_ rule: InactivityRule, now: Date, limit: Int) async throws -> [InactivityCandidate] {
        try await query(
            """
            SELECT id, email, display_name, last_engaged_at FROM users
            WHERE organisation_id = \(organisationID) AND active
              AND inactivity_warned_at <= \(now) - make_interval(days => \(rule.graceDays)::integer)
            ORDER BY inactivity_warned_at, id
            LIMIT \(limit)
            """
        ).map(decodeCandidate)
    }

    /// Switches off the user's email for every non-critical category where it is on (their own
    /// setting, or an inherited one), marked as the inactivity rule's doing, audited; returns the
    /// category keys switched off. A setting the user had switched off stays theirs.
    public func switchOffEmail(of userID: UUID, now: Date) async throws -> [String] {
        let keys = try await query(
            """
            WITH switched AS (
                INSERT INTO preferences AS p (organisation_id, user_id, category_id, channel, enabled, frequency, switched_off)
                SELECT c.organisation_id, \(userID), c.id, 'email', false, 'NONE', 'INACTIVITY' FROM categories c
                WHERE c.organisation_id = \(organisationID) AND NOT c.critical
                ON CONFLICT (organisation_id, user_id, category_id, channel)
                    DO UPDATE SET enabled = false, switched_off = 'INACTIVITY', updated_at = now() WHERE p.enabled
                RETURNING p.category_id
            )
            SELECT c.key FROM switched s JOIN categories c ON c.organisation_id = \(organisationID) AND c.id = s.category_id ORDER BY c.key
            """
        ).map { try $0.decode(String.self, table: "categories") }
        try await query(
            """
            UPDATE users SET inactivity_switched_off_at = \(now), inactivity_warned_at = NULL
            WHERE organisation_id = \(organisationID) AND id = \(userID)
            """)
        try await audit(
            action: "user.inactivity_switch_off", targetType: "user", targetID: userID.lowercased, before: nil,
            after: .object(["channel": .string("email"), "categories": .array(keys.map { .string($0) }), "via": .string("inactivity")]))
        return keys
    }
}

private func decodeCandidate(_ row: PostgresRow) throws -> InactivityCandidate {
    let (id, email, name, engaged) = try row.decode((UUID, String, String, Date).self, table: "users")
    return InactivityCandidate(userID: id, email: email, displayName: name, lastEngagedAt: engaged)
}
