import Foundation
import HeraldCore
import PostgresNIO

extension DecisionCounts: StoredDocument {}

/// A stored event: one call of notify.
/// Where an event stands at some instant: still to be delivered (`deliver_at` in the future),
/// delivered (its time has come: in-app rows visible, deliveries and digest items due), or
/// cancelled.
public enum EventState: String, Sendable, CaseIterable {
    case scheduled = "SCHEDULED"
    case delivered = "DELIVERED"
    case cancelled = "CANCELLED"
}

/// Something a request with an Idempotency-Key made, with the hash of that request's body.
public protocol HasRequestHash {
    var requestHash: String? { get }
}

public struct EventRecord: Sendable, Equatable, HasRequestHash {
    public var id: UUID
    public var typeID: UUID
    public var typeKey: String
    public var actorType: ActorKind
    public var actorID: UUID?
    public var audience: Audience
    public var payload: JSONValue
    public var subjectType: String?
    public var subjectID: String?
    public var severity: Severity
    public var priority: Priority
    public var deliverAt: Date
    public var expiresAt: Date?
    public var status: EventStatus
    public var idempotencyKey: String?
    public var requestHash: String?
    public var counts: DecisionCounts
    public var createdAt: Date
    public var cancelledAt: Date?
    public var tags: [String] = []
    /// A chunked fan-out's progress; nil when notify wrote every recipient itself.
    public var fanout: FanoutProgress?
    /// The schedule that sent it (an occurrence, or a run by hand); nil for a notify.
    public var scheduleID: UUID?
    /// Where the notification leads, as sent; nil when the event named none.
    public var url: String?
    /// Who caused the event in the integrator's domain (the request's `actor`), as sent.
    public var sourceActor: JSONValue?

    /// Where the event stands at `now`.
    public func state(at now: Date) -> EventState {
        if status == .cancelled { return .cancelled }
        return deliverAt > now ? .scheduled : .delivered
    }
}

/// What notify stores about the event itself, beside the plan: the request, with what planning
/// settled (the type, severity and priority after defaults, when it is delivered).
public struct NewEvent: Sendable {
    public var id: UUID
    public var typeID: UUID
    public var request: EventRequest
    public var severity: Severity
    public var priority: Priority
    public var deliverAt: Date
    public var idempotencyKey: String?
    public var requestHash: String?
}

/// Names in an audience that do not exist in the organisation.
public struct UnknownAudience: Error, Sendable, Equatable {
    public var userIDs: [UUID]
    public var roleKeys: [String]
    public var groupKeys: [String]
}

/// What a cancellation stopped.
public struct Cancellation: Sendable, Equatable {
    public var deliveries: Int
    public var digestItems: Int
    public var notifications: Int
}

/// The organisation's settings the engine reads.
public struct EngineSettings: Sendable {
    public var name: String
    public var slug: String
    public var defaultLocale: String
    public var defaultTimezone: String
    public var throttlePerMinute: Int?
    /// Most notifications per user per minute across all categories; nil: no such limit.
    public var userThrottlePerMinute: Int?
}

extension TenantTransaction {
    // MARK: Gathering what the planner needs

    /// The organisation's name, defaults and throttle, as a read that can go out with others.
    func engineSettingsRead() -> StoreRead<EngineSettings> {
        StoreRead(
            statement: """
                SELECT name, slug, default_locale, default_timezone, (settings->>'throttle_per_minute')::int,
                       (settings->>'user_throttle_per_minute')::int
                FROM organisations WHERE id = \(organisationID)
                """,
            decode: { rows in
                guard let row = rows.first else { throw StoreError.notFound("organisation") }
                let (name, slug, locale, timezone, throttle, userThrottle) = try row.decode(
                    (String, String, String, String, Int?, Int?).self)
                return EngineSettings(
                    name: name, slug: slug, defaultLocale: locale, defaultTimezone: timezone, throttlePerMinute: throttle,
                    userThrottlePerMinute: userThrottle)
            })
    }

    /// Sets the per-user throttle across all categories (nil or 0 switches it off).
    public func setUserThrottle(perMinute: Int?) async throws {
        try await query(
            """
            UPDATE organisations SET settings = CASE WHEN coalesce(\(perMinute), 0) = 0 THEN settings - 'user_throttle_per_minute'
                ELSE settings || jsonb_build_object('user_throttle_per_minute', \(perMinute)) END, updated_at = now()
            WHERE id = \(organisationID)
            """)
    }

    /// Sets the per-user, per-category throttle (nil or 0 switches it off).
    public func setThrottle(perMinute: Int?) async throws {
        try await query(
            """
            UPDATE organisations SET settings = CASE WHEN coalesce(\(perMinute), 0) = 0 THEN settings - 'throttle_per_minute'
                ELSE settings || jsonb_build_object('throttle_per_minute', \(perMinute)) END, updated_at = now()
            WHERE id = \(organisationID)
            """)
    }

    /// Every user the audience reaches, with how they matched, in id order. Unknown names are an
    /// error. `after` and `limit` read one chunk of a large audience (users after that id, at
    /// most that many); nil reads them all.
    public func recipients(for audience: Audience, after: UUID? = nil, limit: Int? = nil) async throws -> [RecipientProfile] {
        // A chunk's names were checked when its event was accepted.
        if limit == nil { try await checkAudienceNames(audience) }
        return try await read(recipientsRead(for: audience, after: after, limit: limit))
    }

    /// The users of `recipients`, without checking the audience's names, as a read that can go
    /// out with others. With `typeKey`, none unless the organisation has that type: the read goes
    /// out with the type's, and a misspelt type in a dry run to everyone read every user before
    /// its 422 (1.3 s for 110 000).
    func recipientsRead(for audience: Audience, after: UUID?, limit: Int?, typeKey: String? = nil) -> StoreRead<[RecipientProfile]> {
        StoreRead(statement: recipientsQuery(for: audience, after: after, limit: limit, typeKey: typeKey)) { rows in
            try rows.map { row in
                let (id, active, email, name, locale, timezone, attributes, byUser, byRoles, byGroups, quietStart, quietEnd) =
                    try row.decode(
                        (UUID, Bool, String, String, String?, String?, JSONDocument<JSONValue>, Bool, [String], [String], Int?, Int?).self,
                        table: "users")
                return RecipientProfile(
                    candidate: Candidate(
                        userID: id, active: active, byUser: byUser, byRoles: byRoles, byGroups: byGroups, byEveryone: audience.everyone),
                    email: email, displayName: name, locale: locale, timezone: timezone,
                    attributes: attributes.value, quietHours: QuietHours.stored(start: quietStart, end: quietEnd))
            }
        }
    }

    /// The statement `recipients` runs (the plan guards explain it).
    func recipientsQuery(for audience: Audience, after: UUID?, limit: Int?, typeKey: String? = nil) -> PostgresQuery {
        // Candidate ids first, each source read in user order from its own index and each id
        // with the sources that named it (audience_members, 0035), then users by primary key: a
        // one-user event does not scan the organisation's users, and a chunk costs its size. Each
        // candidate's user is looked up by itself (a lateral subquery that OFFSET 0 keeps from
        // being flattened): joined, the planner (which guesses a function's rows) merged the
        // candidates with the organisation's users read from the first, so the millionth member's
        // chunk read the 990 000 before it, and as "id = ANY(candidates)" it filtered the whole
        // organisation when its statistics were from before a bulk import (PlanGuardTests).
        return """
            SELECT u.id, u.active, u.email, u.display_name, u.locale, u.timezone, u.attributes, c.by_user, c.role_keys, c.group_keys,
                   u.quiet_hours_start::int, u.quiet_hours_end::int
            FROM audience_members(\(organisationID), \(audience.everyone), \(audience.userIDs)::uuid[], \(audience.roleKeys)::text[],
                                  \(audience.groupKeys)::text[], \(after)::uuid, \(limit)::integer) c
            CROSS JOIN LATERAL (SELECT * FROM users u WHERE u.organisation_id = \(organisationID) AND u.id = c.user_id OFFSET 0) u
            WHERE \(typeKey)::text IS NULL
               OR EXISTS (SELECT FROM notification_types t WHERE t.organisation_id = \(organisationID) AND t.key = \(typeKey)::text)
            ORDER BY u.id
            """
    }

    /// How many users the audience names now, counting at most `atMost` (nil: all). Explicit
    /// user ids count as named: notify checks they exist first.
    public func audienceCount(_ audience: Audience, atMost: Int? = nil) async throws -> Int {
        let rows = try await query(
            """
            SELECT count(*)::int FROM audience_candidates(\(organisationID), \(audience.everyone), \(audience.userIDs)::uuid[],
                \(audience.roleKeys)::text[], \(audience.groupKeys)::text[], NULL, \(atMost)::integer)
            """)
        return try rows[0].decode(Int.self)
    }

    /// Checks what notify checks before it plans (the type, the audience's names) without
    /// reading a user: a request kept for later, such as a schedule's event, is checked at once
    /// and costs the same for an audience of a million.
    @discardableResult
    public func checkEventRequest(_ request: EventRequest) async throws -> NotificationType {
        let (found, unknown) = try await read(typeRead(key: request.typeKey), unknownAudienceRead(request.audience))
        guard let type = found else { throw UnknownNotificationType(key: request.typeKey) }
        if let unknown { throw unknown }
        return type
    }

    public func checkAudienceNames(_ audience: Audience) async throws {
        let unknown: UnknownAudience? = try await read(unknownAudienceRead(audience))
        if let unknown { throw unknown }
    }

    /// The names in `audience` that this organisation does not have, if any, as a read that can
    /// go out with others.
    func unknownAudienceRead(_ audience: Audience) -> StoreRead<UnknownAudience?> {
        guard !audience.userIDs.isEmpty || !audience.roleKeys.isEmpty || !audience.groupKeys.isEmpty else { return .ready(nil) }
        return StoreRead(
            statement: """
                SELECT
                  ARRAY(SELECT x FROM unnest(\(audience.userIDs)::uuid[]) x WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.organisation_id = \(organisationID) AND u.id = x)),
                  ARRAY(SELECT x FROM unnest(\(audience.roleKeys)::text[]) x WHERE NOT EXISTS (SELECT 1 FROM roles r WHERE r.organisation_id = \(organisationID) AND r.key = x)),
                  ARRAY(SELECT x FROM unnest(\(audience.groupKeys)::text[]) x WHERE NOT EXISTS (SELECT 1 FROM groups g WHERE g.organisation_id = \(organisationID) AND g.key = x))
                """,
            decode: { rows in
                let (users, roles, groups) = try rows[0].decode(([UUID], [String], [String]).self)
                guard !users.isEmpty || !roles.isEmpty || !groups.isEmpty else { return nil }
                return UnknownAudience(userIDs: users, roleKeys: roles, groupKeys: groups)
            })
    }

    /// The `exclude_user_ids` of `audience` that this organisation has no user for (each once, at
    /// most 20). The API refuses
    /// them as it refuses unknown `user_ids` (so that an event never stores another organisation's
    /// ids, and a mistyped exclusion is not silently an exclusion of nobody: a trial); a schedule's
    /// occurrence does not, since excluding a user deleted since changes nothing.
    public func unknownExclusions(_ audience: Audience) async throws -> [UUID] {
        guard !audience.excludeUserIDs.isEmpty else { return [] }
        return try await query(
            """
            SELECT DISTINCT x FROM unnest(\(audience.excludeUserIDs)::uuid[]) x
            WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.organisation_id = \(organisationID) AND u.id = x)
            ORDER BY x LIMIT 20
            """
        ).map { try $0.decode(UUID.self) }
    }

    /// Users' own settings for one category, by user and channel; `users` confines them.
    func preferencesRead(forCategory categoryID: UUID, users: [UUID]?) -> StoreRead<[UUID: [NotificationChannel: PreferenceSetting]]> {
        StoreRead(
            statement: """
                SELECT \(unescaped: preferenceColumns) FROM preferences
                WHERE organisation_id = \(organisationID) AND category_id = \(categoryID) AND (\(users)::uuid[] IS NULL OR user_id = ANY(\(users)::uuid[]))
                """,
            decode: decodePreferences)
    }

    /// The settings of `users` for the category of the type with this key, as a read that can go
    /// out before the type is known.
    func preferencesRead(forTypeKey typeKey: String, users: [UUID]) -> StoreRead<[UUID: [NotificationChannel: PreferenceSetting]]> {
        guard !users.isEmpty else { return .ready([:]) }
        return StoreRead(
            statement: """
                SELECT \(unescaped: preferenceColumns) FROM preferences
                WHERE organisation_id = \(organisationID) AND user_id = ANY(\(users)::uuid[])
                  AND category_id = (SELECT category_id FROM notification_types WHERE organisation_id = \(organisationID) AND key = \(typeKey))
                """,
            decode: decodePreferences)
    }

    /// How many notified events of the category (of any category: nil) each user had in the
    /// last minute, as a read that can go out with others. Both read the index kept for the
    /// limits (`event_recipients_limited`: rows written while a limit was set, 0053); for every category, one minute of each
    /// category the trace names, found by stepping from one category to the next in that index
    /// (a loose index scan: one lookup per category), so deleted categories still count.
    func recentNotifiedRead(categoryID: UUID?, now: Date, users: [UUID]?) -> StoreRead<[UUID: Int]> {
        let decode: ([PostgresRow]) throws -> [UUID: Int] = { rows in
            Dictionary(uniqueKeysWithValues: try rows.map { try $0.decode((UUID, Int).self) })
        }
        guard let categoryID else {
            return StoreRead(
                statement: """
                    WITH RECURSIVE traced(category_id) AS (
                        SELECT (SELECT category_id FROM event_recipients
                                WHERE organisation_id = \(organisationID) AND notified AND counted_by_limits IS NOT FALSE
                                ORDER BY category_id LIMIT 1)
                        UNION ALL
                        SELECT (SELECT r.category_id FROM event_recipients r
                                WHERE r.organisation_id = \(organisationID) AND r.notified AND r.counted_by_limits IS NOT FALSE
                                  AND r.category_id > t.category_id
                                ORDER BY r.category_id LIMIT 1)
                        FROM traced t WHERE t.category_id IS NOT NULL)
                    SELECT r.user_id, count(*)::int FROM traced t
                    CROSS JOIN LATERAL (
                        SELECT r.user_id FROM event_recipients r
                        WHERE r.organisation_id = \(organisationID) AND r.category_id = t.category_id
                          AND r.notified AND r.counted_by_limits IS NOT FALSE AND r.created_at > \(now) - interval '1 minute'
                          AND (\(users)::uuid[] IS NULL OR r.user_id = ANY(\(users)::uuid[]))) r
                    GROUP BY r.user_id
                    """,
                decode: decode)
        }
        return StoreRead(
            statement: """
                SELECT user_id, count(*)::int FROM event_recipients
                WHERE organisation_id = \(organisationID) AND category_id = \(categoryID)
                  AND notified AND counted_by_limits IS NOT FALSE AND created_at > \(now) - interval '1 minute'
                  AND (\(users)::uuid[] IS NULL OR user_id = ANY(\(users)::uuid[]))
                GROUP BY user_id
                """,
            decode: decode)
    }

    // MARK: Writing an event and its plan

    /// Serialises notify calls that share an idempotency key. False when another transaction
    /// holds it, i.e. the first request with this key is still running.
    public func lockIdempotencyKey(_ key: String) async throws -> Bool {
        let rows = try await query(
            "SELECT pg_try_advisory_xact_lock(hashtextextended(\(organisationID.uuidString + "|" + key), 0))")
        return try rows[0].decode(Bool.self)
    }

    /// The event an idempotency key already produced.
    public func event(idempotencyKey: String) async throws -> EventRecord? {
        try await query(
            "SELECT \(unescaped: eventColumns) FROM events e WHERE e.organisation_id = \(organisationID) AND e.idempotency_key = \(idempotencyKey)"
        ).first.map(decodeEvent)
    }

    /// Writes the event, its in-app rows, deliveries, digest items and decision trace, and
    /// wakes listeners when the transaction commits.
    /// Returns the event as stored, read back with the writes (sent together: one wait).
    public func write(_ event: NewEvent, type: TypeProfile, plan: Plan) async throws -> EventRecord {
        try await query(
            [try insertEventStatement(event, counts: plan.counts, expanding: false)] + recipientStatements(event, type: type, plan: plan),
            then: eventRead(event.id))
    }

    /// The event row of a fan-out to expand in chunks and its bus message; returns the event as
    /// stored, all sent together.
    func writeExpandingEvent(_ event: NewEvent) async throws -> EventRecord {
        try await query(
            [try insertEventStatement(event, counts: DecisionCounts(), expanding: true), announceStatement(event.id, work: .fanout)],
            then: eventRead(event.id))
    }

    /// The event row alone; `expanding`: its recipients are written later, in chunks (0021).
    private func insertEventStatement(_ event: NewEvent, counts: DecisionCounts, expanding: Bool) throws -> PostgresQuery {
        let request = event.request
        return try """
        INSERT INTO events (organisation_id, id, type_id, actor_type, actor_id, source_actor, audience, payload, subject_type, subject_id,
                            severity, priority, deliver_at, expires_at, idempotency_key, request_hash, counts, url, tags, fanout_state,
                            schedule_id)
        VALUES (\(organisationID), \(event.id), \(event.typeID), \(actor.kind), \(actor.id), \(request.sourceActor.map { JSONDocument($0) }),
                \(JSONDocument(request.audience)), \(JSONDocument(request.payload)), \(request.subjectType), \(request.subjectID),
                \(event.severity), \(event.priority), \(event.deliverAt), \(request.expiresAt), \(event.idempotencyKey), \(event.requestHash),
                \(counts), \(request.url), \(request.tags)::text[], \(expanding ? "EXPANDING" : nil),
                schedule_of_key(\(event.idempotencyKey)::text))
        """
    }

    /// The rows of a plan (all of an event's, or one chunk's), and the bus message at commit.
    func writeRecipients(_ event: NewEvent, type: TypeProfile, plan: Plan) async throws {
        try await query(try await recipientStatements(event, type: type, plan: plan))
    }

    /// `writeRecipients` in two steps, for a chunk written beside the one before it
    /// (`writeChunkBehind`): every row but the in-app ones, then (`inApp`), once the chunk is
    /// fenced, the in-app rows, whose trigger takes the recipients' stream locks (0046): held
    /// from there to the commit only, never while this chunk waits for the one before.
    func writeRecipientsButInApp(_ event: NewEvent, type: TypeProfile, plan: Plan) async throws -> PostgresQuery? {
        var statements = try await recipientStatements(event, type: type, plan: plan)
        let inApp = plan.notifications.isEmpty ? nil : statements.removeLast()
        try await query(statements)
        return inApp
    }

    /// The statements of `writeRecipients`, to be sent together (`query(_:)` of several): one
    /// wait for all the tables instead of one per table.
    /// The in-app rows' statement is the last (`writeRecipientsButInApp` takes it off); the bus
    /// message before it is sent at the commit whatever its place.
    private func recipientStatements(_ event: NewEvent, type: TypeProfile, plan: Plan) async throws -> [PostgresQuery] {
        let request = event.request
        var statements: [PostgresQuery] = []
        // The in-app rows go last: their trigger takes the recipients' stream locks shared
        // (0046), held to the commit, which a first stream opening waits for.
        var inApp: PostgresQuery?
        if !plan.notifications.isEmpty {
            // What the event says is stored once per distinct shared text (migration 0025); a
            // row keeps its own title and body only when its template made them personal.
            let n = plan.notifications
            var contentOf: [NotificationText: UUID] = [:]
            var contents: [(id: UUID, text: NotificationText)] = []
            let contentIDs = n.map { row in
                let text = NotificationText(title: row.shared.subject, body: row.shared.body)
                if let id = contentOf[text] { return id }
                let id = UUID()
                contentOf[text] = id
                contents.append((id, text))
                return id
            }
            let personal = n.map { $0.title != $0.shared.subject || $0.body != $0.shared.body }
            let titles = zip(n, personal).map { $1 ? $0.title : "" }
            let bodies = zip(n, personal).map { $1 ? $0.body : "" }
            statements.append(
                """
                INSERT INTO notification_contents (organisation_id, id, event_id, title, body)
                SELECT \(organisationID), id, \(event.id), title, body
                FROM unnest(\(contents.map(\.id))::uuid[], \(contents.map(\.text.title))::text[], \(contents.map(\.text.body))::text[])
                     AS row(id, title, body)
                """)
            inApp =
                """
                INSERT INTO notifications (organisation_id, id, event_id, user_id, type_id, category_id, severity, priority,
                                           content_id, title, body, visible_at, expires_at)
                SELECT \(organisationID), id, \(event.id), user_id, \(type.id), \(type.categoryID), \(event.severity),
                       \(event.priority), content_id, CASE WHEN personal THEN title END, CASE WHEN personal THEN body END,
                       \(event.deliverAt), \(request.expiresAt)
                FROM unnest(\(UUIDArray(n.map(\.id)))::uuid[], \(UUIDArray(n.map(\.userID)))::uuid[], \(UUIDArray(contentIDs))::uuid[], \(personal)::boolean[],
                            \(titles)::text[], \(bodies)::text[])
                     AS row(id, user_id, content_id, personal, title, body)
                """
        }
        // The deliveries go after the trace rows, whose check locks the users once for the
        // chunk: a delivery (or an in-app row) whose trace row this transaction wrote needs no
        // check of its own (0054).
        var deliveries: PostgresQuery?
        if !plan.deliveries.isEmpty {
            let d = plan.deliveries
            // A row held for its recipient's quiet hours is due when they end, the others when the
            // event is: the times are sent only when some row is held (unnest pads the empty
            // array with nulls).
            let heldUntil = d.contains { $0.notBefore != nil } ? d.map { $0.notBefore ?? event.deliverAt } : []
            deliveries =
                ("""
                INSERT INTO deliveries (organisation_id, id, event_id, user_id, channel, destination, endpoint_id, next_attempt_at, urgent)
                SELECT \(organisationID), id, \(event.id), user_id, channel, destination, nullif(endpoint_id, '')::uuid,
                       coalesce(due_at, \(event.deliverAt)), \(event.priority.isUrgent)
                FROM unnest(\(UUIDArray(d.map(\.id)))::uuid[], \(UUIDArray(d.map(\.userID)))::uuid[], \(d.map(\.channel))::text[], \(d.map(\.destination))::text[],
                            \(d.map { $0.endpointID?.uuidString ?? "" })::text[], \(heldUntil)::timestamptz[])
                     AS row(id, user_id, channel, destination, endpoint_id, due_at)
                """)
        }
        if !plan.digestItems.isEmpty {
            let g = plan.digestItems
            // Each item goes in its recipient's first slot after the event is due (migration 0012).
            let slots = try await digestSlots(for: Array(Set(g.map(\.userID))), after: event.deliverAt)
            let slotAt = try g.map { item in
                guard let slots = slots[item.userID] else { throw StoreError.notFound("user") }
                return slots.slot(item.frequency)
            }
            statements.append(
                """
                INSERT INTO digest_items (organisation_id, id, event_id, user_id, category_id, channel, frequency, due_after, slot_at)
                SELECT \(organisationID), id, \(event.id), user_id, \(type.categoryID), channel, frequency, \(event.deliverAt), slot_at
                FROM unnest(\(g.map(\.id))::uuid[], \(g.map(\.userID))::uuid[], \(g.map(\.channel))::text[], \(g.map(\.frequency))::text[],
                            \(slotAt)::timestamptz[])
                     AS row(id, user_id, channel, frequency, slot_at)
                """)
        }
        if !plan.traces.isEmpty {
            // Recipients whose channels were decided alike share one event_decisions row (0028);
            // each trace row keeps the ids of its own rows, in channel order.
            let t = plan.traces
            var decisionOf: [[SharedChannelDecision]: UUID] = [:]
            var decisions: [(id: UUID, channels: [SharedChannelDecision])] = []
            var decisionIDs: [UUID] = []
            // Each trace's own rows, as a slice of one array of every id (1-based, inclusive:
            // `records[first:last]`, empty when last < first); was a text array literal per
            // recipient, formatted here and parsed by PostgreSQL.
            var records: [UUID] = []
            var firsts: [Int32] = []
            var lasts: [Int32] = []
            decisionIDs.reserveCapacity(t.count)
            firsts.reserveCapacity(t.count)
            lasts.reserveCapacity(t.count)
            records.reserveCapacity(t.count * 2)
            // Recipients in a row mostly share their decisions: a trace decided as the one before
            // it takes its set without building and hashing the set again.
            var previous: (channels: [TracedChannel], id: UUID)?
            for trace in t {
                if let previous, Self.decidedAlike(trace.channels, previous.channels) {
                    decisionIDs.append(previous.id)
                } else {
                    let shared = trace.channels.map(SharedChannelDecision.init)
                    let id: UUID
                    if let known = decisionOf[shared] {
                        id = known
                    } else {
                        id = UUID()
                        decisionOf[shared] = id
                        decisions.append((id, shared))
                    }
                    decisionIDs.append(id)
                    previous = (trace.channels, id)
                }
                firsts.append(Int32(records.count + 1))
                for channel in trace.channels { channel.appendRecordIDs(to: &records) }
                lasts.append(Int32(records.count))
            }
            statements.append(
                try """
                INSERT INTO event_decisions (organisation_id, id, event_id, channels)
                SELECT \(organisationID), id, \(event.id), channels
                FROM unnest(\(decisions.map(\.id))::uuid[], \(decisions.map { JSONDocument($0.channels) })::jsonb[]) AS row(id, channels)
                """)
            // The many recipients decided alike, by one rule, are one row of a run (0069) rather
            // than a row each, when no per-minute limit counts the rows (the limits read
            // event_recipients) and there are enough of them for it to matter.
            var own = Array(t.indices)
            if !plan.countedByLimits, let run = Self.traceRun(t, decisionIDs: decisionIDs) {
                let each = Int(lasts[run[0]] - firsts[run[0]] + 1)
                // Their rows' ids end to end, 16 bytes each (0069: a page reads its bytes alone).
                var runRecords = ByteBuffer()
                runRecords.reserveCapacity(run.count * each * 16)
                for index in run where each > 0 {
                    for id in records[Int(firsts[index] - 1)..<Int(lasts[index])] {
                        withUnsafeBytes(of: id.uuid) { _ = runRecords.writeBytes($0) }
                    }
                }
                let first = t[run[0]]
                let users = run.map { t[$0].targeting.userID }
                statements.append(
                    """
                    INSERT INTO event_recipient_runs (organisation_id, event_id, first_user, last_user, category_id, targeted, rule, reason,
                                                      notified, decision_id, records_each, size, user_ids, records)
                    VALUES (\(organisationID), \(event.id), \(users[0]), \(users[users.count - 1]), \(type.categoryID),
                            \(first.targeting.targeted), \(first.targeting.rule), \(first.targeting.reason.rawValue), \(first.notified),
                            \(decisionIDs[run[0]]), \(each), \(users.count), \(UUIDArray(users))::uuid[], \(runRecords)::bytea)
                    """)
                let inRun = Set(run)
                own = own.filter { !inRun.contains($0) }
            }
            if !own.isEmpty {
                let o = own.map { t[$0] }
                // With a run, the other rows' ids alone (their slices renumbered).
                var ownRecords = records
                var ownFirsts = own.map { firsts[$0] }
                var ownLasts = own.map { lasts[$0] }
                if own.count < t.count {
                    ownRecords = []
                    for (position, index) in own.enumerated() {
                        ownFirsts[position] = Int32(ownRecords.count + 1)
                        if lasts[index] >= firsts[index] { ownRecords += records[Int(firsts[index] - 1)..<Int(lasts[index])] }
                        ownLasts[position] = Int32(ownRecords.count)
                    }
                }
                statements.append(
                    """
                    INSERT INTO event_recipients (organisation_id, event_id, user_id, category_id, targeted, rule, reason, notified,
                                                  decision_id, record_ids, counted_by_limits)
                    SELECT \(organisationID), \(event.id), user_id, \(type.categoryID), targeted, rule, reason, notified,
                           decision_id, coalesce((\(UUIDArray(ownRecords))::uuid[])[first:last], '{}'), \(plan.countedByLimits)
                    FROM unnest(\(UUIDArray(o.map(\.targeting.userID)))::uuid[], \(o.map(\.targeting.targeted))::boolean[], \(o.map(\.targeting.rule))::text[],
                                \(o.map(\.targeting.reason))::text[], \(o.map(\.notified))::boolean[], \(UUIDArray(own.map { decisionIDs[$0] }))::uuid[],
                                \(ownFirsts)::integer[], \(ownLasts)::integer[])
                         AS row(user_id, targeted, rule, reason, notified, decision_id, first, last)
                    """)
            }
        }
        if let deliveries { statements.append(deliveries) }
        statements.append(announceStatement(event.id, work: plan.deliveries.isEmpty ? [] : .deliveries))
        if let inApp { statements.append(inApp) }
        return statements
    }

    /// Recipients written as one run of the trace (0069), at least this many.
    static let traceRunMinimum = 1_000

    /// The indices of `traces` that make the write's run, in their users' order (as uuid sorts):
    /// the largest set of targeted recipients with the same decisions and rule, when it has
    /// `traceRunMinimum` or more; nil otherwise.
    static func traceRun(_ traces: [RecipientTrace], decisionIDs: [UUID]) -> [Int]? {
        guard traces.count >= traceRunMinimum else { return nil }
        struct Key: Hashable {
            var decision: UUID
            var rule: String
            var reason: ReasonCode
            var notified: Bool
        }
        var members: [Key: [Int]] = [:]
        var previous: (key: Key, index: Int)?
        for (index, trace) in traces.enumerated() where trace.targeting.targeted {
            // Neighbours mostly share a key: the last one is reused without hashing a new one.
            let key: Key
            if let previous, decisionIDs[previous.index] == decisionIDs[index],
                traces[previous.index].targeting.rule == trace.targeting.rule,
                traces[previous.index].targeting.reason == trace.targeting.reason, traces[previous.index].notified == trace.notified
            {
                key = previous.key
            } else {
                key = Key(
                    decision: decisionIDs[index], rule: trace.targeting.rule, reason: trace.targeting.reason, notified: trace.notified)
            }
            members[key, default: []].append(index)
            previous = (key, index)
        }
        guard var run = members.values.max(by: { $0.count < $1.count }), run.count >= traceRunMinimum else { return nil }
        let user = { (index: Int) in traces[index].targeting.userID }
        if !zip(run, run.dropFirst()).allSatisfy({ uuidPrecedes(user($0), user($1)) }) {
            run.sort { uuidPrecedes(user($0), user($1)) }
        }
        return run
    }

    /// Whether two recipients' channels share one decision set (`SharedChannelDecision`): the same
    /// decisions, each with as many rows.
    static func decidedAlike(_ a: [TracedChannel], _ b: [TracedChannel]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { $0.decision == $1.decision && $0.recordCount == $1.recordCount }
    }

    /// Tells the bus the event committed (delivered at commit, never for a rolled-back
    /// transaction), and what it left for the work runners.
    private func announceStatement(_ eventID: UUID, work: EventWork) -> PostgresQuery {
        "SELECT pg_notify('herald_events', \(organisationID.lowercased + ":" + eventID.lowercased + ":" + work.flags))"
    }

    // MARK: Reading and cancelling events

    public func event(_ id: UUID) async throws -> EventRecord {
        try await read(eventRead(id))
    }

    /// `event(_:)` as a read that can go out with other statements.
    func eventRead(_ id: UUID) -> StoreRead<EventRecord> {
        StoreRead(statement: "SELECT \(unescaped: eventColumns) FROM events e WHERE e.organisation_id = \(organisationID) AND e.id = \(id)")
        {
            rows in
            guard let row = rows.first else { throw StoreError.notFound("event") }
            return try decodeEvent(row)
        }
    }

    /// The newest event of a type, if any.
    public func latestEvent(typeID: UUID) async throws -> EventRecord? {
        try await query(
            "SELECT \(unescaped: eventColumns) FROM events e WHERE e.organisation_id = \(organisationID) AND e.type_id = \(typeID) ORDER BY e.created_at DESC, e.id DESC LIMIT 1"
        ).first.map(decodeEvent)
    }

    /// Events newest first, optionally of one type, in one state, or sent by one schedule.
    public func events(
        typeID: UUID?, state: EventState? = nil, scheduleID: UUID? = nil, idempotencyKey: String? = nil, now: Date = Date(), limit: Int,
        after cursor: PageCursor?
    ) async throws -> Page<EventRecord> {
        let rows = try await query(
            """
            SELECT \(unescaped: eventColumns) FROM events e
            WHERE e.organisation_id = \(organisationID)
              AND (\(idempotencyKey)::text IS NULL OR e.idempotency_key = \(idempotencyKey))
              AND (\(typeID)::uuid IS NULL OR e.type_id = \(typeID))
              AND (\(scheduleID)::uuid IS NULL OR e.schedule_id = \(scheduleID))
              AND CASE \(state?.rawValue)::text
                  WHEN 'SCHEDULED' THEN e.status = 'ACCEPTED' AND e.deliver_at > \(now)
                  WHEN 'DELIVERED' THEN e.status = 'ACCEPTED' AND e.deliver_at <= \(now)
                  WHEN 'CANCELLED' THEN e.status = 'CANCELLED'
                  ELSE true END
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (e.created_at, e.id) < ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY e.created_at DESC, e.id DESC
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeEvent), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Stops what has not gone out: pending deliveries, unsent digest items, in-app rows not yet
    /// visible. What already went out stays. Returns nil when the event was already cancelled.
    public func cancelEvent(_ id: UUID, now: Date) async throws -> Cancellation? {
        _ = try await event(id)
        let updated = try await query(
            "UPDATE events SET status = 'CANCELLED', cancelled_at = \(now) WHERE organisation_id = \(organisationID) AND id = \(id) AND status = 'ACCEPTED' RETURNING id"
        )
        guard !updated.isEmpty else { return nil }
        let deliveries = try await query(
            """
            UPDATE deliveries SET status = 'CANCELLED', last_error = 'Not sent: the event was cancelled.', updated_at = \(now)
            WHERE organisation_id = \(organisationID) AND event_id = \(id) AND status IN ('PENDING', 'FAILED') RETURNING id
            """
        ).count
        let digest = try await query(
            "UPDATE digest_items SET cancelled_at = \(now) WHERE organisation_id = \(organisationID) AND event_id = \(id) AND sent_at IS NULL AND cancelled_at IS NULL RETURNING id"
        ).count
        let notifications = try await query(
            "DELETE FROM notifications WHERE organisation_id = \(organisationID) AND event_id = \(id) AND visible_at > \(now) RETURNING id"
        ).count
        return Cancellation(deliveries: deliveries, digestItems: digest, notifications: notifications)
    }
}

/// What an in-app row says: stored once per event for all the rows that say the same.
private struct NotificationText: Hashable {
    var title: String
    var body: String
}

/// One channel of a decision set as stored in `event_decisions.channels` (0028): the trace's
/// record without the ids of the rows it made, and how many it made.
struct SharedChannelDecision: Codable, Hashable {
    var channel: NotificationChannel
    var enabled: Bool
    var frequency: Frequency
    var conditions: [Condition]
    var source: PreferenceSource
    var outcome: ChannelOutcome
    var reason: ReasonCode
    var records: Int
    /// For CONDITION_NOT_MET, which condition (absent from sets stored before it was kept).
    var failedCondition: Int?

    init(_ traced: TracedChannel) {
        channel = traced.decision.channel
        enabled = traced.decision.preference.enabled
        frequency = traced.decision.preference.frequency
        conditions = traced.decision.preference.conditions
        source = traced.decision.preference.source
        outcome = traced.decision.outcome
        reason = traced.decision.reason
        records = traced.recordCount
        failedCondition = traced.decision.failedCondition
    }
}

extension TracedChannel {
    /// The rows the channel made, in the order a trace row lists them: the in-app row, the
    /// outbox rows, the digest item (a channel makes one kind, by its outcome).
    var recordIDs: [UUID] {
        var ids: [UUID] = []
        appendRecordIDs(to: &ids)
        return ids
    }

    /// How many `recordIDs` there are, without building them.
    var recordCount: Int { (notificationID == nil ? 0 : 1) + deliveryIDs.count + (digestItemID == nil ? 0 : 1) }

    /// Appends `recordIDs` to `ids`: a fan-out chunk lists 10 000 recipients' ids in one array.
    func appendRecordIDs(to ids: inout [UUID]) {
        if let notificationID { ids.append(notificationID) }
        ids += deliveryIDs
        if let digestItemID { ids.append(digestItemID) }
    }
}

/// One channel of the trace as stored in `event_recipients.channels` (rows from before 0028),
/// or put back together from a decision set and a trace row's ids.
public struct TraceChannelRecord: Codable, Sendable, Equatable {
    public var channel: NotificationChannel
    public var enabled: Bool
    public var frequency: Frequency
    public var conditions: [Condition]
    public var source: PreferenceSource
    public var outcome: ChannelOutcome
    public var reason: ReasonCode
    /// For CONDITION_NOT_MET, the index in `conditions` of the first one not met.
    public var failedCondition: Int?
    public var notificationID: UUID?
    /// Every outbox row of the channel (webhook and chat: one per endpoint).
    public var deliveryIDs: [UUID]
    public var digestItemID: UUID?

    /// The first outbox row.
    public var deliveryID: UUID? { deliveryIDs.first }

    /// A channel of a decision set, with the ids of its rows taken from the front of `ids`.
    init(_ shared: SharedChannelDecision, ids: inout ArraySlice<UUID>) {
        let own = ids.prefix(shared.records)
        ids = ids.dropFirst(shared.records)
        channel = shared.channel
        enabled = shared.enabled
        frequency = shared.frequency
        conditions = shared.conditions
        source = shared.source
        outcome = shared.outcome
        reason = shared.reason
        failedCondition = shared.failedCondition
        notificationID = shared.outcome == .inApp ? own.first : nil
        deliveryIDs = shared.outcome == .immediate ? Array(own) : []
        digestItemID = shared.outcome == .digest ? own.first : nil
    }

    init(_ traced: TracedChannel) {
        var ids = traced.recordIDs[...]
        self.init(SharedChannelDecision(traced), ids: &ids)
    }

    enum CodingKeys: String, CodingKey {
        case channel, enabled, frequency, conditions, source, outcome, reason
        case failedCondition = "failed_condition"
        case notificationID = "notification_id", deliveryIDs = "delivery_ids", digestItemID = "digest_item_id"
    }
}

private let eventColumns = """
    e.id, e.type_id, (SELECT t.key FROM notification_types t WHERE t.organisation_id = e.organisation_id AND t.id = e.type_id),
    e.actor_type, e.actor_id, e.audience, e.payload, e.subject_type, e.subject_id, e.severity, e.priority,
    e.deliver_at, e.expires_at, e.status, e.idempotency_key, e.request_hash, e.counts, e.created_at, e.cancelled_at, e.tags,
    e.fanout_state, e.fanout_done, e.fanout_expected, e.fanout_finished_at, e.fanout_error, e.schedule_id, e.url, e.source_actor
    """

private func decodeEvent(_ row: PostgresRow) throws -> EventRecord {
    let (
        id, typeID, typeKey, actorType, actorID, audience, payload, subjectType, subjectID, severity, priority,
        deliverAt, expiresAt, status, key, hash, counts, created, cancelled, tags, fanoutState, fanoutDone, fanoutExpected, fanoutFinished,
        fanoutError, scheduleID, url, sourceActor
    ) =
        try row.decode(
            (
                UUID, UUID, String, ActorKind, UUID?, JSONDocument<Audience>, JSONDocument<JSONValue>, String?, String?, Severity, Priority,
                Date, Date?, EventStatus, String?, String?, DecisionCounts, Date, Date?, [String], FanoutState?, Int, Int?, Date?, String?,
                UUID?, String?, JSONDocument<JSONValue>?
            ).self, table: "events")
    return EventRecord(
        id: id, typeID: typeID, typeKey: typeKey, actorType: actorType, actorID: actorID, audience: audience.value, payload: payload.value,
        subjectType: subjectType, subjectID: subjectID, severity: severity,
        priority: priority, deliverAt: deliverAt, expiresAt: expiresAt, status: status,
        idempotencyKey: key, requestHash: hash,
        counts: counts,
        createdAt: created, cancelledAt: cancelled, tags: tags,
        fanout: fanoutState.map {
            FanoutProgress(state: $0, done: fanoutDone, expected: fanoutExpected, finishedAt: fanoutFinished, error: fanoutError)
        }, scheduleID: scheduleID, url: url, sourceActor: sourceActor?.value)
}

/// What a preference read selects (`decodePreferences`).
private let preferenceColumns = "user_id, channel, enabled, frequency, conditions, switched_off"

/// Preference rows (`preferenceColumns`) by user and channel.
private func decodePreferences(_ rows: [PostgresRow]) throws -> [UUID: [NotificationChannel: PreferenceSetting]] {
    var result: [UUID: [NotificationChannel: PreferenceSetting]] = [:]
    for row in rows {
        let (user, channel, enabled, frequency, conditions, switchedOff) =
            try row.decode((UUID, NotificationChannel, Bool, Frequency, JSONDocument<[Condition]>, String?).self, table: "preferences")
        result[user, default: [:]][channel] = PreferenceSetting(
            enabled: enabled, frequency: frequency, conditions: conditions.value, switchedOff: switchedOff.flatMap(SwitchOff.init))
    }
    return result
}

extension [PreferenceCell] {
    /// The organisation's defaults (`preferenceDefaults`) for one category, by channel.
    func settings(forCategory categoryID: UUID) -> [NotificationChannel: PreferenceSetting] {
        Dictionary(filter { $0.categoryID == categoryID }.map { ($0.channel, $0.setting) }, uniquingKeysWith: { first, _ in first })
    }
}
