import Foundation
import HeraldCore
import PostgresNIO

// Digests that are sent (issue 11, migration 0012): notify stamps each digest item with its
// slot; `claim_digest_runs` makes a run per (user, frequency, slot) once the slot has come,
// attaching its items, and leases due runs; every attempt drops the items that no longer
// qualify; completion marks the items sent with the run, in one transaction.

/// Where a digest run stands (`digest_runs.status`).
public enum DigestRunStatus: String, Sendable, Codable, CaseIterable, StoredWord {
    case pending = "PENDING"
    case sending = "SENDING"
    case failed = "FAILED"
    case sent = "SENT"
    case dead = "DEAD"
    /// Every item was dropped at send time: nothing was sent.
    case empty = "EMPTY"
}

/// A digest run a worker holds the lease of (`claim_digest_runs`).
public struct ClaimedDigestRun: Sendable, Hashable {
    public var organisationID: UUID
    public var runID: UUID
    public var attempt: Int

    public init(organisationID: UUID, runID: UUID, attempt: Int) {
        self.organisationID = organisationID
        self.runID = runID
        self.attempt = attempt
    }
}

/// One digest of one user for one slot.
public struct DigestRun: Sendable, Equatable {
    public var id: UUID
    public var userID: UUID
    public var frequency: Frequency
    /// The slot the run is named after (the window's end): unique per user and frequency.
    public var slotAt: Date
    public var status: DigestRunStatus
    public var attempts: Int
    public var maxAttempts: Int
    public var nextAttemptAt: Date
    /// When the first attempt attached the items; nil before.
    public var frozenAt: Date?
    public var itemCount: Int
    public var lastError: String?
    public var sentAt: Date?
}

/// The email items of a user waiting for the digest of one slot (no run made yet).
public struct WaitingDigest: Sendable, Equatable {
    public var frequency: Frequency
    public var slotAt: Date
    public var items: Int
}

/// Why an item attached to a run was left out of it when the run was sent.
public enum DigestDrop: String, Sendable, Codable, CaseIterable {
    case eventCancelled = "EVENT_CANCELLED"
    case eventExpired = "EVENT_EXPIRED"
    case userInactive = "USER_INACTIVE"
    case channelDisabled = "CHANNEL_DISABLED"
    case frequencyNone = "FREQUENCY_NONE"
    case conditionNotMet = "CONDITION_NOT_MET"
}

/// One item of a digest as it is sent: the event rendered for its recipient.
public struct DigestEntry: Sendable {
    public var itemID: UUID
    public var createdAt: Date
    public var rendering: EventRendering
}

/// What sending a run needs: the run, its recipient, and the items that still qualify.
public struct DigestWork: Sendable {
    public var organisationID: UUID
    public var run: DigestRun
    public var entries: [DigestEntry]
    /// Items left out at this attempt, with why.
    public var dropped: [UUID: DigestDrop]
    /// The organisation's digest templates by locale (none: the built-in default).
    public var templates: [String: TemplateContent] = [:]
}

/// A user's digest slots after some instant: the next daily and the next weekly one.
/// Slots whose digest run is already made (`herald digests send --at` ahead of its time): an
/// item goes to the next one instead.
struct MadeSlots {
    struct Slot: Hashable {
        var user: UUID
        var frequency: Frequency
        var at: Date
    }
    var taken: Set<Slot>

    var isEmpty: Bool { taken.isEmpty }
    func map<T>(_ transform: (Slot) -> T) -> [T] { taken.map(transform) }

    /// `slot`, or the first slot of `schedule` after it whose digest is not made yet.
    func free(_ slot: Date, of user: UUID, _ frequency: Frequency, in schedule: DigestSchedule) -> Date {
        var slot = slot
        while taken.contains(Slot(user: user, frequency: frequency, at: slot)) { slot = schedule.slot(after: slot) }
        return slot
    }
}

struct DigestSlots {
    var daily: Date
    var weekly: Date

    func slot(_ frequency: Frequency) -> Date { frequency == .weekly ? weekly : daily }
}

extension Database {
    /// Makes the runs of every slot that has come by `now` (unless `makeRuns` is false), then
    /// leases up to `limit` due runs to `worker` across organisations (`claim_digest_runs`,
    /// SECURITY DEFINER).
    public func claimDigestRuns(
        worker: String, limit: Int, leaseSeconds: Int, now: Date, organisation: UUID? = nil, makeRuns: Bool = true
    ) async throws -> [ClaimedDigestRun] {
        try await query(
            """
            SELECT organisation_id, run_id, attempt
            FROM claim_digest_runs(\(worker), \(limit)::integer, \(leaseSeconds)::integer, \(now)::timestamptz, \(organisation)::uuid,
                                   \(makeRuns)::boolean)
            """
        ).map { row in
            let (org, id, attempt) = try row.decode((UUID, UUID, Int).self)
            return ClaimedDigestRun(organisationID: org, runID: id, attempt: attempt)
        }
    }
}

private let digestRunColumns = """
    id, user_id, frequency, slot_at, status, attempts, max_attempts, next_attempt_at, frozen_at, item_count, last_error, sent_at
    """

private func decodeDigestRun(_ row: PostgresRow) throws -> DigestRun {
    let (id, user, frequency, slot, status, attempts, maxAttempts, next, frozen, count, error, sent) = try row.decode(
        (UUID, UUID, Frequency, Date, DigestRunStatus, Int, Int, Date, Date?, Int, String?, Date?).self, table: "digest_runs")
    return DigestRun(
        id: id, userID: user, frequency: frequency, slotAt: slot, status: status, attempts: attempts, maxAttempts: maxAttempts,
        nextAttemptAt: next, frozenAt: frozen, itemCount: count, lastError: error, sentAt: sent)
}

extension TenantTransaction {
    /// When a digest item made now for each of `users` would be due, daily and weekly (a dry run
    /// shows it): the slot an item of an event due at `instant` would join. Nothing is locked:
    /// a dry run writes nothing, and holds nothing either.
    public func digestDueTimes(for users: [UUID], after instant: Date) async throws -> [UUID: (daily: Date, weekly: Date)] {
        try await digestSlots(for: users, after: instant, holdingSchedules: false).mapValues { ($0.daily, $0.weekly) }
    }

    /// Each user's next daily and weekly slot strictly after `instant`: their own hour and
    /// weekday, else the organisation's, in their time zone, else the organisation's.
    ///
    /// For the items notify writes, so the organisation's row is first held FOR SHARE until the
    /// transaction ends: a change of digest hour, weekday or time zone (the organisation's, or
    /// a user's after `holdDigestSchedules`) takes the row before it changes anything, so it
    /// either waits for these items to commit and then moves them too, or commits first and the
    /// schedule read below (a statement of its own, so it sees that commit) slots them by it.
    /// Never an item slotted by the old schedule after the re-slot ran: two "daily" digests in
    /// a day. One row, whatever the audience, and no lock on the users (their own updates, the
    /// inactivity sweep's among them, go on). `holdingSchedules: false` reads without that hold.
    func digestSlots(for users: [UUID], after instant: Date, holdingSchedules: Bool = true) async throws -> [UUID: DigestSlots] {
        if holdingSchedules { try await query("SELECT 1 FROM organisations WHERE id = \(organisationID) FOR SHARE") }
        let schedules = try await digestSchedules(for: users)
        var slots = schedules.mapValues { schedules in
            DigestSlots(daily: schedules.daily.slot(after: instant), weekly: schedules.weekly.slot(after: instant))
        }
        // A slot whose digest was already made (`herald digests send --at` ahead of its time) is
        // not this item's: the next one is. (Left there, the item waited for a claim to move it,
        // and explain showed a due time that would not be kept.)
        let made = try await madeSlots(for: users, after: instant)
        guard !made.isEmpty else { return slots }
        for user in Set(made.map(\.user)) {
            guard let schedule = schedules[user], var slot = slots[user] else { continue }
            slot.daily = made.free(slot.daily, of: user, .daily, in: schedule.daily)
            slot.weekly = made.free(slot.weekly, of: user, .weekly, in: schedule.weekly)
            slots[user] = slot
        }
        return slots
    }

    /// The slots after `instant` whose digest is already made for `users`.
    private func madeSlots(for users: [UUID], after instant: Date) async throws -> MadeSlots {
        MadeSlots(
            taken: Set(
                try await query(
                    """
                    SELECT user_id, frequency, slot_at FROM digest_runs
                    WHERE organisation_id = \(organisationID) AND user_id = ANY(\(users)::uuid[]) AND slot_at > \(instant)
                    """
                ).map { row in
                    let (user, frequency, slot) = try row.decode((UUID, Frequency, Date).self, table: "digest_runs")
                    return MadeSlots.Slot(user: user, frequency: frequency, at: slot)
                }))
    }

    /// Each user's daily and weekly digest schedule, as `digestSlots` reads them.
    private func digestSchedules(for users: [UUID]) async throws -> [UUID: (daily: DigestSchedule, weekly: DigestSchedule)] {
        let rows = try await query(
            """
            SELECT u.id, coalesce(u.timezone, o.default_timezone), coalesce(u.digest_hour, o.digest_hour)::int,
                   coalesce(u.digest_weekday, o.digest_weekday)::int
            FROM users u JOIN organisations o ON o.id = u.organisation_id
            WHERE u.organisation_id = \(organisationID) AND u.id = ANY(\(users)::uuid[])
            """)
        var schedules: [UUID: (daily: DigestSchedule, weekly: DigestSchedule)] = [:]
        for row in rows {
            let (user, zone, hour, weekday) = try row.decode((UUID, String, Int, Int).self, table: "users")
            let timeZone = TimeZone(identifier: zone) ?? .gmt
            guard let daily = DigestSchedule(cadence: .daily, hour: hour, timeZone: timeZone),
                let weekly = DigestSchedule(cadence: .weekly(weekday: weekday), hour: hour, timeZone: timeZone)
            else { throw StoreError.notFound("digest schedule") }
            schedules[user] = (daily, weekly)
        }
        return schedules
    }

    /// Holds the organisation's row against the notifies writing digest items (`digestSlots`)
    /// until this transaction ends: call it before changing a user's digest hour, weekday, time
    /// zone or email preferences (or the organisation's default ones), then
    /// `reslotWaitingDigestItems`. (A change of the organisation's own updates
    /// that row, which holds it the same way.)
    public func holdDigestSchedules() async throws {
        try await query("SELECT 1 FROM organisations WHERE id = \(organisationID) FOR NO KEY UPDATE")
    }

    /// Moves the items still waiting for a digest (no run made, their slot still to come) of
    /// `users` (nil: every user of the organisation) to the slot their schedule and their
    /// preference give now: the first after the later of `now` and the item's due time. After a
    /// change of digest hour, weekday or time zone, what was waiting goes out once, at the new
    /// time, not partly at the old time and partly at the new (two "daily" digests in a day).
    /// After a change of the email frequency (the user's, or the organisation's default they
    /// inherit): `DAILY` ↔ `WEEKLY` moves the items to the other cadence's slot (a trial's user
    /// who chose weekly got the daily digest of what was waiting); `IMMEDIATE` makes them due at
    /// once, as one digest of what waited rather than one email each (an item of an event due
    /// later waits for that time); off or `NONE` leaves them for the send to drop. The cell is
    /// resolved by `PreferenceResolver`, as notify resolves it. A thousand users at a time, so an organisation's change holds one
    /// batch in memory. Returns how many moved.
    @discardableResult
    public func reslotWaitingDigestItems(of users: [UUID]?, now: Date) async throws -> Int {
        // Not a slot that has come by either clock: its run is being made (`claim_digest_runs`).
        var waitingUsers = users ?? []
        if users == nil {
            waitingUsers = try await query(
                """
                SELECT DISTINCT user_id FROM digest_items
                WHERE organisation_id = \(organisationID) AND run_id IS NULL AND sent_at IS NULL AND cancelled_at IS NULL
                  AND slot_at > greatest(\(now), now())
                """
            ).map { try $0.decode(UUID.self) }
        }
        var movedCount = 0
        for start in stride(from: 0, to: waitingUsers.count, by: 1000) {
            let batch = Array(waitingUsers[start..<min(start + 1000, waitingUsers.count)])
            // Each item with what its cell resolves from now (`PreferenceResolver`): the user's
            // setting, the organisation's default, the type's default channels (none when the
            // type is gone: the item keeps its frequency) and whether the category is critical.
            let waiting = try await query(
                """
                SELECT i.id, i.user_id, i.channel, i.frequency, i.due_after, i.slot_at, p.enabled, p.frequency, d.enabled, d.frequency,
                       t.default_channels, c.critical
                FROM digest_items i
                LEFT JOIN preferences p ON p.organisation_id = i.organisation_id AND p.user_id = i.user_id
                     AND p.category_id = i.category_id AND p.channel = i.channel
                LEFT JOIN preference_defaults d ON d.organisation_id = i.organisation_id AND d.category_id = i.category_id
                     AND d.channel = i.channel
                LEFT JOIN events e ON e.organisation_id = i.organisation_id AND e.id = i.event_id
                LEFT JOIN notification_types t ON t.organisation_id = e.organisation_id AND t.id = e.type_id
                LEFT JOIN categories c ON c.organisation_id = i.organisation_id AND c.id = i.category_id
                WHERE i.organisation_id = \(organisationID) AND i.user_id = ANY(\(batch)::uuid[]) AND i.run_id IS NULL
                  AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.slot_at > greatest(\(now), now())
                """
            ).map { row in
                let (id, user, channel, current, dueAfter, slot, own, ownFrequency, fallback, fallbackFrequency, channels, critical) =
                    try row.decode(
                        (UUID, UUID, NotificationChannel, Frequency, Date, Date, Bool?, Frequency?, Bool?, Frequency?, [String]?, Bool?)
                            .self,
                        table: "digest_items")
                var wanted = current
                if let channels {
                    let resolved = PreferenceResolver.resolve(
                        channel: channel, categoryIsCritical: critical ?? false,
                        typeDefaultChannels: Set(channels.compactMap(NotificationChannel.init(rawValue:))),
                        user: own.map { PreferenceSetting(enabled: $0, frequency: ownFrequency ?? .none) },
                        organisationDefault: fallback.map { PreferenceSetting(enabled: $0, frequency: fallbackFrequency ?? .none) })
                    wanted = resolved.enabled ? resolved.frequency : .none
                }
                return (id: id, user: user, current: current, dueAfter: dueAfter, slot: slot, wanted: wanted)
            }
            guard !waiting.isEmpty else { continue }
            let users = Array(Set(waiting.map(\.user)))
            let schedules = try await digestSchedules(for: users)
            // Nor into a slot whose digest is already made (as `digestSlots`).
            let made = try await madeSlots(for: users, after: now)
            var moved: [(id: UUID, frequency: Frequency, slot: Date)] = []
            for item in waiting {
                guard let schedules = schedules[item.user] else { continue }
                switch item.wanted {
                case .daily, .weekly:
                    let schedule = item.wanted == .weekly ? schedules.weekly : schedules.daily
                    let fresh = made.free(schedule.slot(after: max(now, item.dueAfter)), of: item.user, item.wanted, in: schedule)
                    if fresh != item.slot || item.wanted != item.current { moved.append((item.id, item.wanted, fresh)) }
                case .immediate:
                    // Due at once, all under one frequency and one slot, so the next claim makes
                    // one run of them (an item of an event due later waits for its own time).
                    moved.append((item.id, .daily, max(now, item.dueAfter)))
                case .none:
                    continue
                }
            }
            guard !moved.isEmpty else { continue }
            // Fenced as read: an item a run took meanwhile keeps its run's slot.
            movedCount += try await query(
                """
                UPDATE digest_items i SET slot_at = m.slot_at, frequency = m.frequency
                FROM unnest(\(moved.map(\.id))::uuid[], \(moved.map(\.frequency))::text[], \(moved.map(\.slot))::timestamptz[])
                     AS m (id, frequency, slot_at)
                WHERE i.organisation_id = \(organisationID) AND i.id = m.id AND i.run_id IS NULL AND i.sent_at IS NULL
                  AND i.cancelled_at IS NULL AND i.slot_at > greatest(\(now), now())
                RETURNING i.id
                """
            ).count
        }
        return movedCount
    }

    public func digestRun(_ id: UUID) async throws -> DigestRun {
        guard
            let row = try await query(
                "SELECT \(unescaped: digestRunColumns) FROM digest_runs WHERE organisation_id = \(organisationID) AND id = \(id)"
            ).first
        else { throw StoreError.notFound("digest run") }
        return try decodeDigestRun(row)
    }

    /// The categories of the items a digest run of `userID` carried, in no particular order: not
    /// those of items the run dropped at send time (a condition no longer met) or that were
    /// cancelled, which the email did not show.
    public func digestRunCategories(_ runID: UUID, userID: UUID) async throws -> [UUID] {
        try await query(
            """
            SELECT DISTINCT category_id FROM digest_items
            WHERE organisation_id = \(organisationID) AND run_id = \(runID) AND user_id = \(userID)
              AND dropped_reason IS NULL AND cancelled_at IS NULL
            """
        ).map { try $0.decode(UUID.self, table: "digest_items") }
    }

    /// A user's digest runs, newest slot first (the first page of `digestRuns(of:limit:after:)`).
    public func digestRuns(of userID: UUID, limit: Int = 50) async throws -> [DigestRun] {
        try await digestRuns(of: userID, limit: limit, after: nil).items
    }

    /// A page of a user's digest runs, newest slot first (then by id: a user has one run per
    /// frequency and slot). A user the organisation does not have is not found, not an empty page.
    public func digestRuns(of userID: UUID, limit: Int, after cursor: PageCursor?) async throws -> Page<DigestRun> {
        _ = try await user(userID)
        let rows = try await query(
            """
            SELECT \(unescaped: digestRunColumns) FROM digest_runs
            WHERE organisation_id = \(organisationID) AND user_id = \(userID)
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (slot_at, id) < ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY slot_at DESC, id DESC
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeDigestRun), limit: limit) { PageCursor(time: $0.slotAt, id: $0.id) }
    }

    /// What waits for a user's next digests: the email items no run has taken yet (not sent, not
    /// cancelled), counted by frequency and slot, soonest first. Usually one slot a frequency; a
    /// slot that has come is still listed until the claim makes its run.
    public func waitingDigests(of userID: UUID) async throws -> [WaitingDigest] {
        try await query(
            """
            SELECT frequency, slot_at, count(*)::int FROM digest_items
            WHERE organisation_id = \(organisationID) AND user_id = \(userID) AND run_id IS NULL AND sent_at IS NULL
              AND cancelled_at IS NULL AND channel = 'email'
            GROUP BY frequency, slot_at
            ORDER BY slot_at, frequency
            """
        ).map { row in
            let (frequency, slot, items) = try row.decode((Frequency, Date, Int).self, table: "digest_items")
            return WaitingDigest(frequency: frequency, slotAt: slot, items: items)
        }
    }

    /// The states a digest run may be retried from (the rule `retryDigestRun` applies, and the
    /// API's 409 names). A run still to be tried, being sent, sent or EMPTY has nothing to retry.
    public static let retryableDigestRunStatuses: [DigestRunStatus] = [.failed, .dead]

    /// Puts a FAILED or DEAD run back in the queue, due at `now` (the workers' clock of due
    /// times), with its attempts budget extended by one (up to `mostAttempts`), as
    /// `retryDelivery` does a delivery's. Its items stay attached as the run froze them: a DEAD
    /// run marks none sent, so the next attempt sends them, under the same Message-ID, each item
    /// checked again (those an attempt dropped as no longer qualifying stay dropped).
    /// Nil when the run is in another state, has used `mostAttempts`, or does not exist.
    public func retryDigestRun(_ id: UUID, now: Date) async throws -> DigestRun? {
        let rows = try await query(
            """
            UPDATE digest_runs SET status = 'PENDING', next_attempt_at = \(now), max_attempts = greatest(max_attempts, attempts + 1),
                last_error = NULL, last_response = NULL, updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id)
              AND status = ANY(\(Self.retryableDigestRunStatuses.map(\.rawValue))::text[]) AND attempts < \(Self.mostAttempts)
            RETURNING \(unescaped: digestRunColumns)
            """)
        return try rows.first.map(decodeDigestRun)
    }

    /// Readies a claimed run for sending, fenced on the lease: reads the items attached to it
    /// (the claim attached them as it made the run) and drops, for good, those that no longer qualify (event cancelled or expired, recipient
    /// deactivated, preference now off or NONE, conditions no longer met). Nil when the fence
    /// refused.
    public func prepareDigest(_ claim: ClaimedDigestRun, worker: String, now: Date) async throws -> DigestWork? {
        guard
            let row = try await query(
                """
                SELECT \(unescaped: digestRunColumns) FROM digest_runs
                WHERE organisation_id = \(organisationID) AND id = \(claim.runID) AND lease_owner = \(worker)
                  AND attempts = \(claim.attempt) AND (status = 'SENDING') IS TRUE -- by key, not by the lease index (0032)
                FOR UPDATE
                """
            ).first
        else { return nil }
        let run = try decodeDigestRun(row)
        let items = try await query(
            """
            SELECT i.id, i.event_id, i.category_id, i.created_at FROM digest_items i
            WHERE i.organisation_id = \(organisationID) AND i.run_id = \(run.id) AND i.dropped_reason IS NULL
            ORDER BY i.created_at, i.id
            """
        ).map { try $0.decode((UUID, UUID, UUID, Date).self, table: "digest_items") }
        let preferences = try await emailPreferences(of: run.userID)
        // Every item's event in one read, each type and category once (not four statements an item).
        let renderings = try await eventRenderings(items.map { (eventID: $0.1, userID: run.userID) })
        var entries: [DigestEntry] = []
        var dropped: [UUID: DigestDrop] = [:]
        for (itemID, eventID, categoryID, createdAt) in items {
            guard let rendering = renderings[RenderingKey(eventID: eventID, userID: run.userID)] else { continue }
            if let drop = Self.drop(
                rendering, user: preferences.user[categoryID], organisation: preferences.organisation[categoryID], now: now)
            {
                dropped[itemID] = drop
            } else {
                entries.append(DigestEntry(itemID: itemID, createdAt: createdAt, rendering: rendering))
            }
        }
        if !dropped.isEmpty {
            try await query(
                """
                UPDATE digest_items i SET dropped_reason = d.reason
                FROM unnest(\(Array(dropped.keys))::uuid[], \(dropped.values.map(\.rawValue))::text[]) AS d (id, reason)
                WHERE i.organisation_id = \(organisationID) AND i.id = d.id
                """)
        }
        let templates = Dictionary(try await digestTemplates().map { ($0.locale, $0.content) }, uniquingKeysWith: { first, _ in first })
        return DigestWork(organisationID: organisationID, run: run, entries: entries, dropped: dropped, templates: templates)
    }

    /// Why an item no longer belongs in a digest at `now`, if it does not: the same decision
    /// notify made, taken again with today's event, recipient and preference.
    static func drop(_ rendering: EventRendering, user: PreferenceSetting?, organisation: PreferenceSetting?, now: Date) -> DigestDrop? {
        if rendering.eventStatus == .cancelled { return .eventCancelled }
        if let expiry = rendering.eventExpiresAt, expiry <= now { return .eventExpired }
        if !rendering.recipient.candidate.active { return .userInactive }
        let input = rendering.input
        let preference = PreferenceResolver.resolve(
            channel: .email, categoryIsCritical: input.type.categoryIsCritical, typeDefaultChannels: input.type.defaultChannels,
            user: user, organisationDefault: organisation)
        let timeZone = TimeZone(identifier: rendering.recipient.timezone ?? input.organisationTimezone) ?? .gmt
        // The same conditions as at notify time, on the day the digest goes: a licence that has
        // expired since drops the item.
        let subject = ConditionSubject(
            payload: input.payload, eventType: input.type.key, recipientAttributes: rendering.recipient.attributes, timeZone: timeZone,
            now: now)
        let decision = ChannelDecider.decide(
            channel: .email, preference: preference, subject: subject, throttled: false, hasDestination: true)
        switch decision.reason {
        case .channelDisabled, .switchedOffInactive: return .channelDisabled
        case .frequencyNone: return .frequencyNone
        case .conditionNotMet: return .conditionNotMet
        default: return nil
        }
    }

    /// The user's own email settings and the organisation's email defaults, by category.
    private func emailPreferences(
        of userID: UUID
    ) async throws -> (
        user: [UUID: PreferenceSetting], organisation: [UUID: PreferenceSetting]
    ) {
        func byCategory(_ cells: [PreferenceCell]) -> [UUID: PreferenceSetting] {
            Dictionary(cells.filter { $0.channel == .email }.map { ($0.categoryID, $0.setting) }, uniquingKeysWith: { first, _ in first })
        }
        return (byCategory(try await preferences(ofUser: userID)), byCategory(try await preferenceDefaults()))
    }

    /// Extends the leases `worker` holds on `claims`.
    public func extendDigestLeases(worker: String, claims: [ClaimedDigestRun], leaseSeconds: Int) async throws {
        try await extendLeases(
            .digestRuns, ids: claims.map(\.runID), attempts: claims.map(\.attempt), worker: worker, leaseSeconds: leaseSeconds)
    }

    /// Records how an attempt ended, fenced on (worker, attempt) like a delivery's. A sent run
    /// marks its items sent in the same transaction; `empty` records a run whose items were all
    /// dropped. False when the fence refused.
    public func completeDigestRun(
        _ claim: ClaimedDigestRun, worker: String, result: AttemptResult, empty: Bool = false
    ) async throws
        -> Bool
    {
        let (status, error, retryAt, response): (DigestRunStatus, String?, Date?, String?) =
            switch result {
            case .sent(_, let response): (empty ? .empty : .sent, nil, nil, response)
            case .failed(_, let error, let retryAt): (.failed, error, retryAt, nil)
            case .dead(_, let error): (.dead, error, nil, nil)
            // A run is never cancelled whole (a cancelled event's items are dropped from it at
            // send time); should a send say so, the run ends like any other that cannot be sent.
            case .cancelled(let error): (.dead, error, nil, nil)
            }
        let rows = try await query(
            """
            UPDATE digest_runs SET
                status = CASE WHEN \(status) = 'FAILED' AND attempts >= max_attempts THEN 'DEAD' ELSE \(status) END,
                last_error = \(error), last_response = \(response), next_attempt_at = coalesce(\(retryAt), next_attempt_at),
                lease_owner = NULL, lease_expires_at = NULL, sent_at = CASE WHEN \(status) = 'SENT' THEN now() ELSE sent_at END,
                updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(claim.runID) AND lease_owner = \(worker) AND attempts = \(claim.attempt)
              AND (status = 'SENDING') IS TRUE -- by key, not by the lease index (0032)
            RETURNING status
            """)
        guard let row = rows.first else { return false }
        if try row.decode(DigestRunStatus.self) == .sent {
            try await query(
                """
                UPDATE digest_items SET sent_at = now()
                WHERE organisation_id = \(organisationID) AND run_id = \(claim.runID) AND dropped_reason IS NULL AND sent_at IS NULL
                """)
        }
        return true
    }

    /// Gives a claimed run back without counting an attempt, due again at `until`; fenced.
    public func releaseDigestRun(_ claim: ClaimedDigestRun, worker: String, until: Date) async throws -> Bool {
        try await !query(
            """
            UPDATE digest_runs SET status = CASE WHEN attempts <= 1 THEN 'PENDING' ELSE 'FAILED' END, attempts = attempts - 1,
                next_attempt_at = \(until), lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(claim.runID) AND lease_owner = \(worker) AND attempts = \(claim.attempt)
              AND (status = 'SENDING') IS TRUE -- by key, not by the lease index (0032)
            RETURNING id
            """
        ).isEmpty
    }
}

/// Digests whose slot has come and that no run has taken yet (`herald digests send --dry-run`).
public struct DueDigest: Sendable, Equatable {
    public var userID: UUID
    public var email: String
    public var frequency: Frequency
    public var slotAt: Date
    public var items: Int
    /// Attempts a run already made for this slot has had (a retry is due); 0 for a run the
    /// next claim will make.
    public var attempts: Int = 0
}

extension TenantTransaction {
    /// What `herald digests send` would attempt by `now`, as the claim decides it
    /// (`claim_digest_runs`): a run per (user, frequency, slot) whose slot has come and has
    /// pending email items and no run yet, and the runs already made whose retry is due. Items
    /// of a slot whose run was made before they committed are not listed: the claim moves them
    /// to the next slot.
    public func dueDigests(now: Date) async throws -> [DueDigest] {
        try await query(
            """
            SELECT user_id, email, frequency, slot_at, items, attempts FROM (
                SELECT i.user_id, u.email, i.frequency, i.slot_at, count(*)::int AS items, 0 AS attempts FROM digest_items i
                JOIN users u ON u.organisation_id = i.organisation_id AND u.id = i.user_id
                WHERE i.organisation_id = \(organisationID) AND i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL
                  AND i.channel = 'email' AND i.slot_at <= \(now)
                  AND NOT EXISTS (
                      SELECT 1 FROM digest_runs r
                      WHERE r.organisation_id = i.organisation_id AND r.user_id = i.user_id AND r.frequency = i.frequency
                        AND r.slot_at = i.slot_at)
                GROUP BY i.user_id, u.email, i.frequency, i.slot_at
                UNION ALL
                SELECT r.user_id, u.email, r.frequency, r.slot_at, r.item_count, r.attempts FROM digest_runs r
                JOIN users u ON u.organisation_id = r.organisation_id AND u.id = r.user_id
                WHERE r.organisation_id = \(organisationID)
                  AND (r.status IN ('PENDING', 'FAILED') AND r.next_attempt_at <= \(now)
                       -- a run whose worker died: the claim fails it and takes it again
                       OR r.status = 'SENDING' AND r.lease_expires_at < now() AND r.attempts < r.max_attempts)
            ) due
            ORDER BY slot_at, email
            """
        ).map { row in
            let (user, email, frequency, slot, items, attempts) = try row.decode(
                (UUID, String, Frequency, Date, Int, Int).self, table: "digest_items")
            return DueDigest(userID: user, email: email, frequency: frequency, slotAt: slot, items: items, attempts: attempts)
        }
    }
}
