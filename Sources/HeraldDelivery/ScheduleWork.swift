import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics

// Recurring schedules, a fourth kind of work on the runner (issue 11): `ScheduleQueue` leases
// schedules whose next occurrence is due (`claim_schedules`), `ScheduleHandler` sends one
// occurrence: notify and the move to the next occurrence commit in one transaction, under the
// idempotency key schedule:<id>:<occurrence>. It runs as the application role (an occurrence is
// a notify), in `herald serve`.

extension ClaimedSchedule: WorkClaim {
    public var logMetadata: Logger.Metadata {
        [
            "organisation_id": .string(organisationID.lowercased), "schedule_id": .string(scheduleID.lowercased),
            "occurrence": .string(occurrence.formatted(.iso8601)), "attempt": "\(attempt)",
        ]
    }
}

/// Schedules as a `WorkQueue`. Due times follow `now` (tests inject a clock).
public struct ScheduleQueue: WorkQueue {
    let database: Database
    let organisation: UUID?
    let now: @Sendable () -> Date

    public init(database: Database, organisation: UUID? = nil, now: @escaping @Sendable () -> Date = { Date() }) {
        self.database = database
        self.organisation = organisation
        self.now = now
    }

    public var kind: String { "schedule" }

    /// Occurrences come due with time: the runner's poll finds them.
    public func wakes(on message: BusMessage) -> Bool { false }

    public func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [ClaimedSchedule] {
        try await database.claimSchedules(worker: worker, limit: limit, leaseSeconds: leaseSeconds, now: now(), organisation: organisation)
    }

    public func heartbeat(worker: String, organisation: UUID, claims: [ClaimedSchedule], leaseSeconds: Int) async throws {
        try await database.withTenant(organisation) { tx in
            try await tx.extendScheduleLeases(worker: worker, claims: claims, leaseSeconds: leaseSeconds)
        }
    }

    /// Nothing more: the handler's transaction sent the occurrence and freed the schedule.
    public func complete(
        _ claim: ClaimedSchedule, worker: String, startedAt: Date, outcome: OccurrenceOutcome, logger: Logger
    ) async throws -> Bool {
        outcome != .leaseLost
    }

    /// An occurrence is never given back; this frees the schedule for the next claim.
    public func release(_ claim: ClaimedSchedule, worker: String, until: Date, reason: String) async throws -> Bool {
        try await fail(claim, worker: worker, error: OccurrenceGivenBack(reason: reason))
        return true
    }

    /// Records the failure (the occurrence is tried again, five times at most, then skipped).
    public func fail(_ claim: ClaimedSchedule, worker: String, error: any Error) async throws {
        let next = try await database.withTenant(claim.organisationID) { tx in
            try await tx.schedule(claim.scheduleID).recurrence().occurrences(after: claim.occurrence, limit: 1).first
        }
        try await database.withTenant(claim.organisationID) { tx in
            try await tx.failOccurrence(claim, worker: worker, error: String(describing: error), next: next)
        }
    }

    /// Nothing apart: `claim_schedules` frees expired leases before each claim.
    public func rescueExpired(worker: String) async throws -> Int { 0 }
}

struct OccurrenceGivenBack: Error, CustomStringConvertible {
    var reason: String
    var description: String { reason }
}

/// Sends one occurrence of a schedule.
public struct ScheduleHandler: WorkHandler {
    let database: Database
    /// The runner's name: the lease owner the schedule is fenced on.
    let worker: String
    let fanout: FanoutSettings
    let now: @Sendable () -> Date

    public init(
        database: Database, worker: String, fanout: FanoutSettings = FanoutSettings(), now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.database = database
        self.worker = worker
        self.fanout = fanout
        self.now = now
    }

    public func handle(_ claim: ClaimedSchedule, logger: Logger) async throws -> WorkDisposition<OccurrenceOutcome> {
        let now = now()
        let schedule = try await database.withTenant(claim.organisationID) { tx in try await tx.schedule(claim.scheduleID) }
        // The next occurrence after this one that is still to come: occurrences missed while no
        // instance ran are skipped (one reminder late, not a burst of stale ones).
        let (next, skipped) = Self.next(after: claim.occurrence, now: now, recurrence: try schedule.recurrence())
        let outcome = try await database.withTenant(claim.organisationID) { tx in
            try await tx.sendOccurrence(claim, worker: worker, now: now, next: next, skipped: skipped, fanout: fanout)
        }
        return .done(outcome)
    }

    /// The first occurrence after `occurrence` that is after `now` too, and how many lie between.
    static func next(after occurrence: Date, now: Date, recurrence: Recurrence) -> (Date?, Int) {
        var skipped = 0
        var cursor = occurrence
        while skipped < 10_000 {
            let batch = recurrence.occurrences(after: cursor, limit: 100)
            for candidate in batch {
                if candidate > now { return (candidate, skipped) }
                skipped += 1
            }
            guard let last = batch.last, batch.count == 100 else { return (nil, skipped) }
            cursor = last
        }
        return (nil, skipped)
    }

    public func finished(
        _ claim: ClaimedSchedule, disposition: WorkDisposition<OccurrenceOutcome>?, recorded: Bool?, duration: Duration, logger: Logger
    ) {
        switch disposition {
        case .done(.sent(let eventID, let counts)):
            Counter(label: "herald_schedule_occurrences_total", dimensions: [("outcome", counts == nil ? "replayed" : "sent")]).increment()
            if let counts { EngineMetrics.accepted(.schedule, counts: counts) }
            logger.info("schedule occurrence sent", metadata: ["event_id": .string(eventID.lowercased), "replayed": "\(counts == nil)"])
        case .done(.leaseLost):
            logger.info("schedule occurrence not sent: the lease moved on")
        case .giveBack, nil:
            Counter(label: "herald_schedule_occurrences_total", dimensions: [("outcome", "failed")]).increment()
        }
    }
}
