import Foundation
import HeraldCore
import PostgresNIO

// Chunked fan-out (issue 12, migration 0021): notify to an audience above the synchronous limit
// writes the event alone and answers at once; `herald serve` leases the event (`claim_fanouts`)
// and writes its recipients a chunk at a time, each chunk a transaction that moves the event's
// cursor, progress and counts in the same commit.

/// Where a chunked fan-out stands.
public enum FanoutState: String, Sendable, Codable, StoredWord {
    /// Recipients are still being written.
    case expanding = "EXPANDING"
    /// Every recipient was written.
    case done = "DONE"
    /// The event was cancelled before every chunk was written: the rest never will be.
    case cancelled = "CANCELLED"
    /// A chunk failed ten times in a row (0024): the rest will not be written.
    case failed = "FAILED"
}

/// A chunked fan-out's progress, as `GET /v1/events/{id}` shows it.
public struct FanoutProgress: Sendable, Equatable {
    public var state: FanoutState
    /// Users written so far.
    public var done: Int
    /// How many users the audience named when the first chunk was written; nil before that.
    public var expected: Int?
    public var finishedAt: Date?
    /// The last chunk failure's error, while failures are counted or once the fan-out FAILED.
    public var error: String?
}

/// When notify writes an event's recipients itself and when it leaves them to chunks.
public struct FanoutSettings: Sendable {
    /// Audiences of at most this many users are written in notify's own transaction, with
    /// exact counts in the answer; larger ones in chunks.
    public var synchronousLimit = 10_000
    /// Users per chunk.
    public var chunkSize = 10_000

    public init(synchronousLimit: Int = 10_000, chunkSize: Int = 10_000) {
        self.synchronousLimit = synchronousLimit
        self.chunkSize = chunkSize
    }
}

/// An event leased for its next chunks.
public struct ClaimedFanout: Sendable, Hashable {
    public var organisationID: UUID
    public var eventID: UUID
    /// The fence: the lease's attempt number.
    public var attempt: Int
}

/// Where a chunk planned ahead starts.
public enum ChunkStart: Sendable {
    /// At the event's cursor, as the last committed chunk left it.
    case storedCursor
    /// After this user: the chunk planned before it is being written.
    case after(UUID)
}

/// A chunk planned, not yet written (`prepareChunk`, `writeChunk`).
public struct PreparedChunk: Sendable {
    /// The user the chunk starts after (nil: the first).
    public let after: UUID?
    let planned: PlannedEvent
    let size: Int
    /// How many users the audience names, when they were counted before this chunk was written.
    public var expected: Int? = nil

    /// The chunk's last user, where the next chunk starts.
    public var last: UUID? { planned.recipients.last?.candidate.userID }
    /// Fewer users than asked for: the audience ends with this chunk.
    public var finished: Bool { planned.recipients.count < size }
    /// What the engine decided for the chunk's users.
    public var counts: DecisionCounts { planned.plan.counts }
}

/// An expanding event as a chunk reads it.
struct FanoutRow {
    var status: EventStatus
    var state: FanoutState?
    var owner: String?
    var attempts: Int
    var cursor: UUID?
    var done: Int
    var expected: Int?
    var counts: DecisionCounts
    var request: EventRequest
    var deliverAt: Date

    func isLeased(by worker: String, _ claim: ClaimedFanout) -> Bool {
        state == .expanding && owner == worker && attempts == claim.attempt
    }
}

/// A chunk written beside the one before it could not be recorded (`writeChunkBehind`): its
/// transaction rolls back.
public struct ChunkNotWritten: Error {
    public init() {}
}

/// What one chunk did.
public enum FanoutStep: Sendable, Equatable {
    /// Wrote a chunk; `done` users written in all; `finished` when it was the last.
    case expanded(done: Int, finished: Bool)
    /// The event was cancelled: no more chunks.
    case cancelled(done: Int)
    /// The lease moved on (it expired and another instance took it): nothing was written.
    case leaseLost
}

extension DecisionCounts {
    /// Two chunks' counts together.
    public static func + (a: DecisionCounts, b: DecisionCounts) -> DecisionCounts {
        var sum = DecisionCounts()
        sum.considered = a.considered + b.considered
        sum.targeted = a.targeted + b.targeted
        sum.notTargeted = a.notTargeted + b.notTargeted
        sum.inApp = a.inApp + b.inApp
        sum.immediate = a.immediate + b.immediate
        sum.digest = a.digest + b.digest
        sum.skipped = a.skipped + b.skipped
        sum.throttled = a.throttled + b.throttled
        sum.held = a.held + b.held
        return sum
    }
}

extension Database {
    /// Leases up to `limit` events still expanding (across organisations; `organisation`
    /// confines it, for tests).
    public func claimFanouts(worker: String, limit: Int, leaseSeconds: Int, organisation: UUID? = nil) async throws -> [ClaimedFanout] {
        try await query(
            """
            SELECT organisation_id, event_id, attempt
            FROM claim_fanouts(\(worker), \(limit)::integer, \(leaseSeconds)::integer, \(organisation)::uuid)
            """
        ).map { row in
            let (org, id, attempt) = try row.decode((UUID, UUID, Int).self, table: "events")
            return ClaimedFanout(organisationID: org, eventID: id, attempt: attempt)
        }
    }
}

extension TenantTransaction {
    /// notify's write: the whole event when its audience is within the synchronous limit, else
    /// the event alone, to be expanded in chunks. Returns the event as stored.
    @discardableResult
    public func send(
        _ request: EventRequest, eventID: UUID = UUID(), now: Date, idempotencyKey: String? = nil, requestHash: String? = nil,
        fanout: FanoutSettings
    ) async throws -> EventRecord {
        guard try await audienceCount(request.audience, atMost: fanout.synchronousLimit + 1) > fanout.synchronousLimit else {
            // planEvent checks the type and the audience's names itself.
            let planned = try await planEvent(request, eventID: eventID, now: now, idempotencyKey: idempotencyKey, requestHash: requestHash)
            return try await write(planned.event, type: planned.type, plan: planned.plan)
        }
        // The type (its templates are read by each chunk) and the audience's unknown names, together.
        let type = try await checkEventRequest(request)
        let event = NewEvent(
            id: eventID, typeID: type.id, request: request, severity: request.severity ?? type.defaultSeverity,
            priority: request.priority ?? type.defaultPriority, deliverAt: max(request.deliverAt ?? now, now),
            idempotencyKey: idempotencyKey, requestHash: requestHash)
        return try await writeExpandingEvent(event)
    }

    /// Writes the next chunk of a leased fan-out, fenced on the lease, and moves the event's
    /// cursor, progress and counts in the same transaction; the lease then runs `leaseSeconds`
    /// from the chunk's commit.
    public func expandChunk(_ claim: ClaimedFanout, worker: String, size: Int, now: Date, leaseSeconds: Int) async throws -> FanoutStep {
        guard let row = try await fanoutEvent(claim, locked: true), row.isLeased(by: worker, claim) else { return .leaseLost }
        if row.status == .cancelled {
            try await finishFanout(claim.eventID, state: .cancelled)
            return .cancelled(done: row.done)
        }
        return try await record(
            claim, row, try await planChunk(claim, row, after: row.cursor, size: size, now: now), leaseSeconds: leaseSeconds)
    }

    /// Plans the chunk that starts at `start` without writing it or locking the event, so that
    /// a fan-out plans its next chunk while this one is written (`writeChunk`). Nil when the event
    /// is no longer this lease's to expand, or was cancelled: `expandChunk` then settles it.
    public func prepareChunk(
        _ claim: ClaimedFanout, worker: String, from start: ChunkStart, size: Int, now: Date
    ) async throws -> PreparedChunk? {
        guard let row = try await fanoutEvent(claim, locked: false), row.isLeased(by: worker, claim), row.status != .cancelled
        else { return nil }
        let after: UUID? =
            switch start {
            case .storedCursor: row.cursor
            case .after(let id): id
            }
        return try await planChunk(claim, row, after: after, size: size, now: now)
    }

    /// How many users the event's audience names, for its progress (`fanout.expected`): nil when
    /// it is counted already or the event is no longer this lease's. The handler counts beside the
    /// chunks' writes (a second for a million users), never under the event's row lock, and a
    /// chunk written after the count records it (`PreparedChunk.expected`).
    public func countFanoutAudience(_ claim: ClaimedFanout, worker: String) async throws -> Int? {
        guard let row = try await fanoutEvent(claim, locked: false), row.isLeased(by: worker, claim), row.expected == nil
        else { return nil }
        return try await audienceCount(row.request.audience)
    }

    /// Writes a chunk `prepareChunk` planned, fenced like `expandChunk`, and only if the event's
    /// cursor is still where the chunk starts (it always is while this lease holds: only the
    /// lease's holder writes chunks, one after another).
    public func writeChunk(_ claim: ClaimedFanout, _ chunk: PreparedChunk, worker: String, leaseSeconds: Int) async throws -> FanoutStep {
        guard let row = try await fanoutEvent(claim, locked: true), row.isLeased(by: worker, claim) else { return .leaseLost }
        if row.status == .cancelled {
            try await finishFanout(claim.eventID, state: .cancelled)
            return .cancelled(done: row.done)
        }
        guard row.cursor == chunk.after else { return .leaseLost }
        return try await record(claim, row, chunk, leaseSeconds: leaseSeconds)
    }

    /// Writes a chunk `prepareChunk` planned while the chunk before it is still being written,
    /// which holds the event's row: the recipients first, beside that write, then the event's
    /// row is locked, which waits for the chunk before to commit, and the chunk is fenced like
    /// `writeChunk`. When the lease moved, the event was cancelled or the cursor is not where the
    /// chunk starts (the chunk before did not commit), it throws `ChunkNotWritten`, which rolls
    /// back what it wrote: the caller then settles the event through `expandChunk`.
    public func writeChunkBehind(
        _ claim: ClaimedFanout, _ chunk: PreparedChunk, worker: String, leaseSeconds: Int
    ) async throws -> FanoutStep {
        let planned = chunk.planned
        let inApp = try await writeRecipientsButInApp(planned.event, type: planned.type, plan: planned.plan)
        guard let row = try await fanoutEvent(claim, locked: true), row.isLeased(by: worker, claim), row.status != .cancelled,
            row.cursor == chunk.after
        else { throw ChunkNotWritten() }
        // The in-app rows after the fence: their stream locks (0046) are not held while this
        // chunk waits for the one before (a first stream queued on one would stall both).
        if let inApp { try await query(inApp) }
        return try await recordProgress(claim, row, chunk, leaseSeconds: leaseSeconds)
    }

    /// The event as a chunk needs it; `locked` takes its row lock (a chunk that writes): a lock
    /// for a change of the row but not of its key, so that the next chunk's rows, whose reference
    /// checks share the key's lock (`check_event_references`), are written beside it.
    private func fanoutEvent(_ claim: ClaimedFanout, locked: Bool) async throws -> FanoutRow? {
        guard
            let row = try await query(
                """
                SELECT e.status, e.fanout_state, e.fanout_lease_owner, e.fanout_attempts, e.fanout_cursor, e.fanout_done, e.fanout_expected,
                       e.counts, t.key, e.audience, e.payload, e.source_actor, e.subject_type, e.subject_id, e.severity, e.priority,
                       e.deliver_at, e.expires_at, e.url, e.tags
                FROM events e JOIN notification_types t ON t.organisation_id = e.organisation_id AND t.id = e.type_id
                WHERE e.organisation_id = \(organisationID) AND e.id = \(claim.eventID)
                \(unescaped: locked ? "FOR NO KEY UPDATE OF e" : "")
                """
            ).first
        else { return nil }
        let (
            status, state, owner, attempts, cursor, done, expected, counts, typeKey, audience, payload, sourceActor, subjectType, subjectID,
            severity, priority, deliverAt, expiresAt, url, tags
        ) = try row.decode(
            (
                EventStatus, FanoutState?, String?, Int, UUID?, Int, Int?, DecisionCounts, String, JSONDocument<Audience>,
                JSONDocument<JSONValue>, JSONDocument<JSONValue>?, String?, String?, Severity, Priority, Date, Date?, String?, [String]
            ).self, table: "events")
        let request = EventRequest(
            typeKey: typeKey, audience: audience.value, payload: payload.value, sourceActor: sourceActor?.value, subjectType: subjectType,
            subjectID: subjectID, severity: severity, priority: priority, deliverAt: deliverAt, expiresAt: expiresAt, url: url, tags: tags)
        return FanoutRow(
            status: status, state: state, owner: owner, attempts: attempts, cursor: cursor, done: done, expected: expected, counts: counts,
            request: request, deliverAt: deliverAt)
    }

    private func planChunk(_ claim: ClaimedFanout, _ row: FanoutRow, after: UUID?, size: Int, now: Date) async throws -> PreparedChunk {
        let planned = try await planEvent(
            row.request, eventID: claim.eventID, now: now, chunk: AudienceChunk(after: after, limit: size, deliverAt: row.deliverAt))
        return PreparedChunk(after: after, planned: planned, size: size)
    }

    /// Writes a planned chunk and moves the event's cursor, progress and counts, and the lease's
    /// end to `leaseSeconds` after the commit: the chunk holds the event's row while it is
    /// written, so the heartbeat skips it (`extendFanoutLeases`), and the holder shows itself
    /// alive by each chunk it commits.
    private func record(_ claim: ClaimedFanout, _ row: FanoutRow, _ chunk: PreparedChunk, leaseSeconds: Int) async throws -> FanoutStep {
        let planned = chunk.planned
        try await writeRecipients(planned.event, type: planned.type, plan: planned.plan)
        return try await recordProgress(claim, row, chunk, leaseSeconds: leaseSeconds)
    }

    /// Moves the event's cursor, progress and counts past a chunk written in this transaction.
    private func recordProgress(
        _ claim: ClaimedFanout, _ row: FanoutRow, _ chunk: PreparedChunk, leaseSeconds: Int
    ) async throws -> FanoutStep {
        let planned = chunk.planned
        let written = planned.recipients.count
        // Counted beside the chunks (countFanoutAudience); at the end, at the latest, what was written.
        var expected = row.expected ?? chunk.expected
        if expected == nil, chunk.finished { expected = row.done + written }
        try await query(
            """
            UPDATE events SET fanout_cursor = coalesce(\(chunk.last), fanout_cursor),
                fanout_done = fanout_done + \(written), fanout_expected = coalesce(\(expected), fanout_expected),
                counts = \(row.counts + planned.plan.counts), fanout_failures = 0, fanout_error = NULL,
                fanout_lease_expires_at = greatest(fanout_lease_expires_at, clock_timestamp() + make_interval(secs => \(leaseSeconds)::integer))
            WHERE organisation_id = \(organisationID) AND id = \(claim.eventID)
            """)
        if chunk.finished { try await finishFanout(claim.eventID, state: .done) }
        return .expanded(done: row.done + written, finished: chunk.finished)
    }

    private func finishFanout(_ eventID: UUID, state: FanoutState) async throws {
        try await query(
            """
            UPDATE events SET fanout_state = \(state), fanout_lease_owner = NULL, fanout_lease_expires_at = NULL, fanout_finished_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(eventID)
            """)
    }

    /// Extends the leases `worker` still holds on `claims` (the heartbeat), fenced like a chunk;
    /// returns how many it extended. An event whose row another transaction holds is skipped, not
    /// waited for: that is the lease's own chunk being written, whose commit moves the lease's end
    /// itself, and waiting would hold the other fan-outs' heartbeats, and their next chunks, behind it.
    @discardableResult
    public func extendFanoutLeases(worker: String, claims: [ClaimedFanout], leaseSeconds: Int) async throws -> Int {
        try await query(
            """
            UPDATE events e SET fanout_lease_expires_at = now() + make_interval(secs => \(leaseSeconds)::integer)
            FROM (SELECT l.organisation_id, l.id FROM events l
                  JOIN unnest(\(claims.map(\.eventID))::uuid[], \(claims.map(\.attempt))::integer[]) AS c(id, attempt)
                    ON l.id = c.id AND l.fanout_attempts = c.attempt
                  WHERE l.organisation_id = \(organisationID) AND l.fanout_lease_owner = \(worker)
                    AND (l.fanout_state = 'EXPANDING') IS TRUE -- by key, not by events_fanout_claim (0032)
                  FOR NO KEY UPDATE OF l SKIP LOCKED) held
            WHERE e.organisation_id = \(organisationID) AND e.organisation_id = held.organisation_id AND e.id = held.id
            RETURNING e.id
            """
        ).count
    }

    /// Records a failed chunk (it rolled back whole) and frees the lease, fenced: the next claim
    /// tries the same chunk again, unless this was the `giveUpAfter`-th failure in a row, which
    /// ends the fan-out FAILED. Returns the state after.
    @discardableResult
    public func failFanout(_ claim: ClaimedFanout, worker: String, error: String, giveUpAfter: Int = 10) async throws -> FanoutState? {
        try await query(
            """
            UPDATE events SET fanout_failures = fanout_failures + 1, fanout_error = \(String(error.prefix(1000))),
                fanout_state = CASE WHEN fanout_failures + 1 >= \(giveUpAfter) THEN 'FAILED' ELSE fanout_state END,
                fanout_finished_at = CASE WHEN fanout_failures + 1 >= \(giveUpAfter) THEN now() ELSE fanout_finished_at END,
                fanout_lease_owner = NULL, fanout_lease_expires_at = NULL
            WHERE organisation_id = \(organisationID) AND id = \(claim.eventID) AND fanout_attempts = \(claim.attempt)
              AND fanout_lease_owner = \(worker) AND (fanout_state = 'EXPANDING') IS TRUE -- by key, not by events_fanout_claim (0032)
            RETURNING fanout_state
            """
        ).first?.decode(FanoutState.self)
    }

    /// Records the audience's count that a lease made while planning a chunk it will not write
    /// (its time budget ran out), fenced on the lease; a count already recorded stays.
    public func recordFanoutExpected(_ claim: ClaimedFanout, worker: String, expected: Int) async throws {
        try await query(
            """
            UPDATE events SET fanout_expected = coalesce(fanout_expected, \(expected))
            WHERE organisation_id = \(organisationID) AND id = \(claim.eventID) AND fanout_attempts = \(claim.attempt)
              AND fanout_lease_owner = \(worker) AND (fanout_state = 'EXPANDING') IS TRUE -- by key, not by events_fanout_claim (0032)
            """)
    }

    /// Frees a fan-out's lease after a failed chunk: the next claim goes on from the cursor.
    public func releaseFanout(_ claim: ClaimedFanout, worker: String) async throws {
        try await query(
            """
            UPDATE events SET fanout_lease_owner = NULL, fanout_lease_expires_at = NULL
            WHERE organisation_id = \(organisationID) AND id = \(claim.eventID) AND fanout_attempts = \(claim.attempt)
              AND fanout_lease_owner = \(worker) AND (fanout_state = 'EXPANDING') IS TRUE -- by key, not by events_fanout_claim (0032)
            """)
    }
}
