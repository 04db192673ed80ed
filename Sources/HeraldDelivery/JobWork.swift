import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics

// Scheduled jobs, the third kind of work on the runner (issue 11): `JobQueue` claims due jobs
// (`claim_jobs`: one instance per due run, a run row written with the lease), `JobHandler`
// runs one by name, and completion records the run and sets the next, fenced.

extension ClaimedJob: WorkClaim {
    public var logMetadata: Logger.Metadata {
        [
            "organisation_id": .string(organisationID.lowercased), "job": .string(name.rawValue), "job_run_id": .string(runID.lowercased),
            "attempt": "\(attempt)",
        ]
    }
}

/// Jobs as a `WorkQueue`. Due times follow `now` (tests inject a clock); leases run on the
/// database's clock.
public struct JobQueue: WorkQueue {
    let database: Database
    let organisation: UUID?
    let name: SystemJob?
    let now: @Sendable () -> Date

    /// `organisation` and `name` confine the claims (tests; `herald jobs run NAME`).
    public init(database: Database, organisation: UUID? = nil, name: SystemJob? = nil, now: @escaping @Sendable () -> Date = { Date() }) {
        self.database = database
        self.organisation = organisation
        self.name = name
        self.now = now
    }

    public var kind: String { "job" }

    /// Jobs come due with time or a request through the API: the runner's poll finds both.
    public func wakes(on message: BusMessage) -> Bool { false }

    public func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [ClaimedJob] {
        try await database.claimJobs(
            worker: worker, limit: limit, leaseSeconds: leaseSeconds, now: now(), organisation: organisation, name: name)
    }

    public func heartbeat(worker: String, organisation: UUID, claims: [ClaimedJob], leaseSeconds: Int) async throws {
        try await database.withTenant(organisation) { tx in
            try await tx.extendJobLeases(worker: worker, claims: claims, leaseSeconds: leaseSeconds)
        }
    }

    public func complete(_ claim: ClaimedJob, worker: String, startedAt: Date, outcome: JobOutcome, logger: Logger) async throws -> Bool {
        // A scheduled run moves the schedule on from the queue's clock; a run asked for by hand
        // (perhaps `--at` a year ahead) only from the real one, when its time has really come.
        let now = claim.trigger == .schedule ? now() : Date()
        let duration = Duration.milliseconds(Int64(max(0, Date().timeIntervalSince(startedAt)) * 1000))
        return try await database.withTenant(claim.organisationID) { tx in
            try await tx.completeJobRun(
                claim, worker: worker, outcome: outcome, duration: duration, now: now, nextRunAt: claim.schedule.next(after: now))
        }
    }

    /// A job is never given back (its handler has no slot to wait for): the run ends FAILED.
    public func release(_ claim: ClaimedJob, worker: String, until: Date, reason: String) async throws -> Bool {
        try await complete(
            claim, worker: worker, startedAt: Date(), outcome: JobOutcome(error: reason), logger: Logger(label: "herald.jobs"))
    }

    /// The run could not be recorded: try once more to end it FAILED; if that fails too, the
    /// lease expires and the next claim ends it ABANDONED and runs the job again.
    public func fail(_ claim: ClaimedJob, worker: String, error: any Error) async throws {
        _ = try await complete(
            claim, worker: worker, startedAt: Date(), outcome: JobOutcome(error: String(describing: error)),
            logger: Logger(label: "herald.jobs"))
    }

    /// Nothing apart: `claim_jobs` rescues expired leases before each claim.
    public func rescueExpired(worker: String) async throws -> Int { 0 }
}

/// Runs one job by name. A job that fails reports its error in its run (FAILED), with the
/// counts of what it did before; it runs again at its next scheduled time.
public struct JobHandler: WorkHandler {
    let database: Database
    let now: @Sendable () -> Date
    /// Most rows one retention statement deletes.
    let batch: Int
    /// What the inactivity rule sends its warnings with; nil in a process without SMTP settings
    /// (the inactivity job then fails, and says why, in an organisation whose rule is on).
    let mailer: InactivityMailer?

    public init(
        database: Database, mailer: InactivityMailer? = nil, batch: Int = 2_000, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.database = database
        self.mailer = mailer
        self.batch = batch
        self.now = now
    }

    public func handle(_ claim: ClaimedJob, logger: Logger) async throws -> WorkDisposition<JobOutcome> {
        let now = now()
        var counts: [String: Int] = [:]
        do {
            switch claim.name {
            case .retention:
                counts = try await database.applyRetention(organisation: claim.organisationID, now: now, batch: batch) { counts = $0 }
            case .purgeExpired:
                counts["notifications"] = try await database.purgeExpired(organisation: claim.organisationID, now: now, batch: batch)
            case .inactivity:
                counts = try await database.applyInactivity(organisation: claim.organisationID, now: now, mailer: mailer, logger: logger)
            }
            return .done(JobOutcome(counts: counts))
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            logger.error("job failed", metadata: ["error": "\(String(reflecting: error))"])
            return .done(JobOutcome(counts: counts, error: String(describing: error)))
        }
    }

    public func finished(
        _ claim: ClaimedJob, disposition: WorkDisposition<JobOutcome>?, recorded: Bool?, duration: Duration, logger: Logger
    ) {
        let outcome: String
        switch disposition {
        case .done(let result): outcome = result.error == nil ? "succeeded" : "failed"
        case .giveBack, nil: outcome = "failed"
        }
        Counter(label: "herald_job_runs_total", dimensions: [("job", claim.name.rawValue), ("outcome", outcome)]).increment()
        if case .done(let result) = disposition {
            logger.info(
                "job run finished",
                metadata: [
                    "outcome": .string(outcome),
                    "duration_ms": "\(duration.milliseconds)",
                    "counts": "\(result.counts.filter { $0.value > 0 })", "recorded": "\(recorded.map(String.init) ?? "no")",
                ])
        }
    }
}
