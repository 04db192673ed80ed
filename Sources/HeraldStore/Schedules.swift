import Foundation
import HeraldCore
import PostgresNIO

// Recurring schedules for integrators (issue 11, migration 0015): an event request sent on a
// recurrence rule. `claim_schedules` leases a due schedule; sending an occurrence is one
// transaction: the fence, notify (idempotency key schedule:<id>:<occurrence>) and the move to
// the next occurrence commit together.

/// A recurring schedule.
public struct Schedule: Sendable, Equatable {
    /// How the idempotency keys of occurrences begin (`schedule:<id>:<occurrence>`); reserved.
    public static let idempotencyPrefix = "schedule:"

    public var id: UUID
    public var name: String
    public var typeKey: String
    /// What each occurrence sends (its times are the occurrence's).
    public var event: EventRequest
    public var rule: String
    public var timeZone: String
    public var startsAt: Date
    public var paused: Bool
    /// The next occurrence; nil once the rule has none left.
    public var nextAt: Date?
    /// Occurrences sent, and skipped (missed while no instance ran, or failed five times).
    public var sent: Int
    public var skipped: Int
    public var lastAt: Date?
    public var lastEventID: UUID?
    public var lastError: String?
    public var createdAt: Date
    public var updatedAt: Date

    /// The schedule's recurrence (it was valid when saved).
    public func recurrence() throws -> Recurrence {
        try Recurrence(rule: rule, start: startsAt, timeZone: TimeZone(identifier: timeZone) ?? .gmt)
    }
}

/// A due occurrence a worker holds the lease of (`claim_schedules`).
public struct ClaimedSchedule: Sendable, Hashable {
    public var organisationID: UUID
    public var scheduleID: UUID
    public var attempt: Int
    public var occurrence: Date
}

/// A schedule a create with an Idempotency-Key made (`schedule(idempotencyKey:)`).
public struct KeyedSchedule: Sendable, HasRequestHash {
    public var schedule: Schedule
    public var requestHash: String?
}

/// What sending one occurrence did.
public enum OccurrenceOutcome: Sendable, Equatable {
    /// Sent as this event (or found already sent under its idempotency key: `counts` nil).
    case sent(eventID: UUID, counts: DecisionCounts?)
    /// The fence refused: another worker holds the schedule now.
    case leaseLost
}

private let scheduleColumns = """
    s.id, s.name, t.key, s.event, s.rule, s.time_zone, s.starts_at, s.paused, s.next_at, s.sent, s.skipped, s.last_at,
    s.last_event_id, s.last_error, s.created_at, s.updated_at
    """

private let scheduleFrom = "FROM schedules s JOIN notification_types t ON t.organisation_id = s.organisation_id AND t.id = s.type_id"

private func decodeSchedule(_ row: PostgresRow) throws -> Schedule {
    let (id, name, key, event, rule, zone, starts, paused, next, sent, skipped, last, lastEvent, error, created, updated) = try row.decode(
        (UUID, String, String, JSONDocument<EventRequest>, String, String, Date, Bool, Date?, Int, Int, Date?, UUID?, String?, Date, Date)
            .self, table: "schedules")
    return Schedule(
        id: id, name: name, typeKey: key, event: event.value, rule: rule, timeZone: zone, startsAt: starts, paused: paused, nextAt: next,
        sent: sent, skipped: skipped, lastAt: last, lastEventID: lastEvent, lastError: error, createdAt: created, updatedAt: updated)
}

extension Database {
    /// Leases up to `limit` schedules whose next occurrence is due by `now`, across organisations.
    public func claimSchedules(
        worker: String, limit: Int, leaseSeconds: Int, now: Date, organisation: UUID? = nil
    ) async throws -> [ClaimedSchedule] {
        try await query(
            """
            SELECT organisation_id, schedule_id, attempt, occurrence
            FROM claim_schedules(\(worker), \(limit)::integer, \(leaseSeconds)::integer, \(now)::timestamptz, \(organisation)::uuid)
            """
        ).map { row in
            let (org, id, attempt, occurrence) = try row.decode((UUID, UUID, Int, Date).self, table: "schedules")
            return ClaimedSchedule(organisationID: org, scheduleID: id, attempt: attempt, occurrence: occurrence)
        }
    }
}

extension TenantTransaction {
    /// Refuses (409) to delete a group or role that the audience of a schedule with occurrences
    /// left names (`member`: `groupKeys` or `roleKeys` of its stored audience): its next
    /// occurrence would fail. The schedules found are locked, so a change of their audience waits
    /// for this transaction.
    ///
    /// The caller has locked the group or role row (`FOR UPDATE`), and a schedule being created
    /// or changed holds its audience's names `FOR KEY SHARE` (`lockAudienceNames`): whichever
    /// comes second waits for the first to commit, then sees it.
    func refuseIfSchedulesSend(to member: String, key: String, what: String) async throws {
        let rows = try await query(
            """
            SELECT name FROM schedules WHERE organisation_id = \(organisationID) AND next_at IS NOT NULL
              AND event->'audience'->\(member) ? \(key) ORDER BY name, id FOR SHARE
            """)
        try refuseIfAny(try rows.map { try $0.decode(String.self) }, send: "to this \(what)", unless: "change their audience")
    }

    /// Refuses (409) to erase a user whom a schedule with occurrences left names in its audience
    /// (as a recipient or an exclusion: every occurrence would fail). A schedule being saved holds
    /// the users it names `FOR KEY SHARE` (`lockAudienceNames`) against the caller's `FOR UPDATE`.
    func refuseIfSchedulesName(user id: UUID) async throws {
        let rows = try await query(
            """
            SELECT name FROM schedules s WHERE s.organisation_id = \(organisationID) AND s.next_at IS NOT NULL
              AND EXISTS (
                  SELECT 1 FROM jsonb_array_elements_text(coalesce(s.event->'audience'->'userIDs', '[]') || coalesce(s.event->'audience'->'excludeUserIDs', '[]')) u
                  WHERE lower(u) = \(id.lowercased))
            ORDER BY name, id FOR SHARE
            """)
        try refuseIfAny(try rows.map { try $0.decode(String.self) }, send: "to this user or names them", unless: "change their audience")
    }

    /// Refuses (409) to delete a notification type that a schedule with occurrences left sends
    /// (its events would have no type; the schedule was deleted with the type, unaudited). The
    /// caller has locked the type's row (`FOR UPDATE`): a schedule being created with the type
    /// holds it `FOR KEY SHARE` (its foreign key) and is seen once it commits. Every schedule of
    /// the type is locked and its `next_at` read from the locked row, not filtered in the scan:
    /// a PATCH giving a finished schedule a new rule (no key check, the type unchanged) is waited
    /// for and then seen with its occurrences.
    func refuseIfSchedulesSend(typeID: UUID) async throws {
        let rows = try await query(
            """
            SELECT name, next_at IS NOT NULL FROM schedules WHERE organisation_id = \(organisationID) AND type_id = \(typeID)
            ORDER BY name, id FOR SHARE
            """)
        let sending = try rows.map { try $0.decode((String, Bool).self) }.filter(\.1).map(\.0)
        try refuseIfAny(sending, send: "this notification type", unless: "change their type")
    }

    private func refuseIfAny(_ names: [String], send what: String, unless change: String) throws {
        guard let first = names.first else { return }
        let named = names.count == 1 ? "The schedule \"\(first)\" sends" : "\(names.count) schedules (\"\(first)\" among them) send"
        let schedules = names.count == 1 ? "that schedule" : "those schedules"
        throw StoreError.inUse(
            "\(named) \(what); \(change) or delete \(schedules) first (a paused schedule counts: it would fail when resumed).")
    }

    /// Saves a schedule whose first occurrence is `nextAt` (nil: the rule has none).
    /// `idempotencyKey` and `requestHash`: what `schedule(idempotencyKey:)` finds it by.
    public func createSchedule(
        id: UUID, name: String, event: EventRequest, rule: String, timeZone: String, startsAt: Date, nextAt: Date?,
        idempotencyKey: String? = nil, requestHash: String? = nil
    ) async throws -> Schedule {
        guard let type = try await notificationType(key: event.typeKey) else { throw UnknownNotificationType(key: event.typeKey) }
        try await query(
            """
            INSERT INTO schedules (
                organisation_id, id, name, type_id, event, rule, time_zone, starts_at, next_at, idempotency_key, request_hash)
            VALUES (
                \(organisationID), \(id), \(name), \(type.id), \(JSONDocument(event)), \(rule), \(timeZone), \(startsAt), \(nextAt),
                \(idempotencyKey), \(requestHash))
            """)
        return try await schedule(id)
    }

    /// The schedule a create with `key` made, with the hash of that request; nil when none
    /// (never made, or deleted since). Take `lockIdempotencyKey` first.
    public func schedule(idempotencyKey key: String) async throws -> KeyedSchedule? {
        guard
            let row = try await query(
                "SELECT id, request_hash FROM schedules WHERE organisation_id = \(organisationID) AND idempotency_key = \(key)"
            ).first
        else { return nil }
        let (id, hash) = try row.decode((UUID, String?).self, table: "schedules")
        return KeyedSchedule(schedule: try await schedule(id), requestHash: hash)
    }

    /// Locks the groups, roles and users `audience` names (`FOR KEY SHARE`) until this transaction ends,
    /// so that a deletion waits for it and then finds what it saved. Names that do not exist lock
    /// nothing (the check that follows refuses them).
    public func lockAudienceNames(_ audience: Audience) async throws {
        if !audience.groupKeys.isEmpty {
            try await query(
                """
                SELECT 1 FROM groups WHERE organisation_id = \(organisationID) AND key = ANY (\(audience.groupKeys)::text[]) FOR KEY SHARE
                """)
        }
        if !audience.roleKeys.isEmpty {
            try await query(
                """
                SELECT 1 FROM roles WHERE organisation_id = \(organisationID) AND key = ANY (\(audience.roleKeys)::text[]) FOR KEY SHARE
                """)
        }
        // Named users too: an erasure (`eraseUser`) holds its user `FOR UPDATE`, so a schedule
        // saved meanwhile waits for it, then finds the user gone (a 422), instead of naming them.
        let users = audience.userIDs + audience.excludeUserIDs
        if !users.isEmpty {
            try await query(
                "SELECT 1 FROM users WHERE organisation_id = \(organisationID) AND id = ANY (\(UUIDArray(users))::uuid[]) FOR KEY SHARE")
        }
    }

    /// Replaces what a schedule sends and when. `releasingLease` (a new rhythm) frees its lease:
    /// an occurrence a runner claimed under the old rule is not sent (its fenced send finds the
    /// lease gone), and the next claim follows the new one. A runner reads the event when it
    /// sends, so a new event or name needs no such thing.
    public func updateSchedule(
        _ id: UUID, name: String, event: EventRequest, rule: String, timeZone: String, startsAt: Date, nextAt: Date?,
        releasingLease: Bool
    ) async throws -> Schedule {
        guard let type = try await notificationType(key: event.typeKey) else { throw UnknownNotificationType(key: event.typeKey) }
        let rows = try await query(
            """
            UPDATE schedules SET name = \(name), type_id = \(type.id), event = \(JSONDocument(event)), rule = \(rule),
                time_zone = \(timeZone), starts_at = \(startsAt), next_at = \(nextAt),
                lease_owner = CASE WHEN \(releasingLease) THEN NULL ELSE lease_owner END,
                lease_expires_at = CASE WHEN \(releasingLease) THEN NULL ELSE lease_expires_at END, updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("schedule") }
        return try await schedule(id)
    }

    /// `locking`: the row stays locked to the transaction's end, so two requests that change the
    /// schedule from what they read (pause, resume) take turns, and the second reads the first's.
    public func schedule(_ id: UUID, locking: Bool = false) async throws -> Schedule {
        guard
            let row = try await query(
                """
                SELECT \(unescaped: scheduleColumns) \(unescaped: scheduleFrom) WHERE s.organisation_id = \(organisationID) AND s.id = \(id)
                \(unescaped: locking ? "FOR NO KEY UPDATE OF s" : "")
                """
            ).first
        else { throw StoreError.notFound("schedule") }
        return try decodeSchedule(row)
    }

    /// Schedules, newest first.
    public func schedules(limit: Int, after cursor: PageCursor?) async throws -> Page<Schedule> {
        let rows = try await query(
            """
            SELECT \(unescaped: scheduleColumns) \(unescaped: scheduleFrom)
            WHERE s.organisation_id = \(organisationID)
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (s.created_at, s.id) < ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY s.created_at DESC, s.id DESC
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeSchedule), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Pauses or resumes. Resuming moves the next occurrence to `resumeAt` (the first after now:
    /// what came due while paused is not sent).
    public func setSchedulePaused(_ id: UUID, paused: Bool, resumeAt: Date?) async throws -> Schedule {
        let rows = try await query(
            """
            UPDATE schedules SET paused = \(paused), next_at = CASE WHEN \(paused) THEN next_at ELSE \(resumeAt) END, updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("schedule") }
        return try await schedule(id)
    }

    public func deleteSchedule(_ id: UUID) async throws {
        let rows = try await query("DELETE FROM schedules WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id")
        guard !rows.isEmpty else { throw StoreError.notFound("schedule") }
    }

    /// Sends one claimed occurrence, in this transaction: checks the lease (and locks the
    /// schedule), notifies with the idempotency key `schedule:<id>:<occurrence>` (an occurrence
    /// already sent under it is not sent again), and moves the schedule to `next` (nil: no
    /// occurrence left), counting `skipped` missed occurrences.
    public func sendOccurrence(
        _ claim: ClaimedSchedule, worker: String, now: Date, next: Date?, skipped: Int, fanout: FanoutSettings = FanoutSettings()
    ) async throws -> OccurrenceOutcome {
        guard
            let row = try await query(
                """
                SELECT event FROM schedules
                WHERE organisation_id = \(organisationID) AND id = \(claim.scheduleID) AND (lease_owner = \(worker)) IS TRUE
                  AND attempts = \(claim.attempt)
                FOR UPDATE
                """
            ).first
        else { return .leaseLost }
        var request = try row.decode(JSONDocument<EventRequest>.self, table: "schedules").value
        request.deliverAt = claim.occurrence
        request.expiring(from: claim.occurrence)
        let key = "\(Schedule.idempotencyPrefix)\(claim.scheduleID.lowercased):\(Int64(claim.occurrence.timeIntervalSince1970))"
        let eventID: UUID
        let counts: DecisionCounts?
        if let first = try await event(idempotencyKey: key) {
            (eventID, counts) = (first.id, nil)
        } else {
            let event = try await send(request, now: now, idempotencyKey: key, fanout: fanout)
            (eventID, counts) = (event.id, event.counts)
        }
        try await query(
            """
            UPDATE schedules SET sent = sent + 1, skipped = skipped + \(skipped), last_at = \(claim.occurrence), last_event_id = \(eventID),
                last_error = NULL, failures = 0, next_at = \(next), lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(claim.scheduleID)
            """)
        return .sent(eventID: eventID, counts: counts)
    }

    /// Records a failed occurrence and frees the schedule (fenced): it is tried again at the next
    /// claim, until its fifth failure in a row, which skips it for `next`.
    public func failOccurrence(_ claim: ClaimedSchedule, worker: String, error: String, next: Date?) async throws {
        try await query(
            """
            UPDATE schedules SET last_error = \(error), failures = CASE WHEN failures + 1 >= 5 THEN 0 ELSE failures + 1 END,
                next_at = CASE WHEN failures + 1 >= 5 THEN \(next) ELSE next_at END,
                skipped = skipped + CASE WHEN failures + 1 >= 5 THEN 1 ELSE 0 END,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(claim.scheduleID) AND (lease_owner = \(worker)) IS TRUE AND attempts = \(claim.attempt)
            """)
    }

    /// Extends the leases `worker` holds on `claims`.
    public func extendScheduleLeases(worker: String, claims: [ClaimedSchedule], leaseSeconds: Int) async throws {
        try await extendLeases(
            .schedules, ids: claims.map(\.scheduleID), attempts: claims.map(\.attempt), worker: worker, leaseSeconds: leaseSeconds)
    }
}
