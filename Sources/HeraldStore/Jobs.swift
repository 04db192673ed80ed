import Foundation
import HeraldCore
import PostgresNIO

// Scheduled jobs (issue 11, migration 0013): every organisation has Herald's system jobs, each
// with a schedule; `claim_jobs` leases a due job to one instance with a new run row, and
// completion, fenced on (worker, attempt), records the run and sets the next one.

/// Herald's system jobs: every organisation has one of each.
public enum SystemJob: String, CaseIterable, Sendable, Codable, StoredWord {
    /// Deletes what is older than the organisation's retention (events and everything recorded
    /// about them: decision traces, feed rows, deliveries and attempts, link clicks, digest items
    /// and runs; job runs).
    case retention
    /// Deletes in-app notifications whose expiry has passed.
    case purgeExpired = "purge-expired"
    /// The organisation's inactivity rule, when it is on: warns users who have not engaged for
    /// its period, and switches off the email of those who did not engage after the warning.
    case inactivity

    /// The schedule a new organisation's job starts with: a cron expression in the
    /// organisation's time zone, or an interval.
    public var defaultCron: String? {
        switch self {
        case .retention: "30 3 * * *"
        case .inactivity: "30 4 * * *"
        case .purgeExpired: nil
        }
    }

    public var defaultIntervalSeconds: Int? {
        switch self {
        case .retention, .inactivity: nil
        case .purgeExpired: 900
        }
    }

    /// What the job does, in one sentence.
    public var summary: String {
        switch self {
        case .retention:
            "Deletes events older than the organisation's retention with everything recorded about them, and old digest and job runs."
        case .purgeExpired: "Deletes in-app notifications whose expiry has passed."
        case .inactivity:
            "Warns users who have not engaged for the organisation's inactivity period, and switches off the email of those who did not engage after the warning (when the rule is on)."
        }
    }
}

/// Whether a job is waiting for its time or being run.
public enum JobStatus: String, Sendable, Codable, StoredWord {
    case idle = "IDLE"
    case running = "RUNNING"
}

/// Why a run happened.
public enum JobTrigger: String, Sendable, Codable, StoredWord {
    /// Its time had come.
    case schedule = "SCHEDULE"
    /// Asked for through the API (`POST /v1/jobs/{id}/run`) or `herald jobs run`.
    case manual = "MANUAL"
}

/// How a run ended.
public enum JobRunStatus: String, Sendable, Codable, StoredWord {
    case running = "RUNNING"
    case succeeded = "SUCCEEDED"
    case failed = "FAILED"
    /// Its lease expired (the process died or stalled); the job ran again at the next claim.
    case abandoned = "ABANDONED"
}

/// One run of a job.
public struct JobRun: Sendable, Equatable {
    public var id: UUID
    public var jobID: UUID
    public var trigger: JobTrigger
    public var scheduledFor: Date
    public var attempt: Int
    public var worker: String
    public var status: JobRunStatus
    public var startedAt: Date
    public var finishedAt: Date?
    public var durationMilliseconds: Int?
    /// What the run did, by name (rows deleted per table, for retention).
    public var counts: [String: Int]
    public var error: String?
}

/// A job of the organisation with its schedule and its last run.
public struct Job: Sendable, Equatable {
    public var id: UUID
    public var name: SystemJob
    /// A five-field cron expression in `timeZone`, or nil when the job runs every `intervalSeconds`.
    public var cron: String?
    /// The job's zone; the organisation's when the job has none of its own.
    public var timeZone: String
    public var intervalSeconds: Int?
    public var paused: Bool
    public var status: JobStatus
    public var nextRunAt: Date
    /// A run asked for by hand that has not started yet.
    public var runRequestedAt: Date?
    public var lastRun: JobRun?
    public var createdAt: Date
}

/// A due job a worker holds the lease of (`claim_jobs`).
public struct ClaimedJob: Sendable, Hashable {
    public var organisationID: UUID
    public var jobID: UUID
    public var runID: UUID
    public var name: SystemJob
    public var attempt: Int
    public var trigger: JobTrigger
    public var scheduledFor: Date
    public var schedule: JobSchedule

    public static func == (lhs: ClaimedJob, rhs: ClaimedJob) -> Bool { lhs.runID == rhs.runID }
    public func hash(into hasher: inout Hasher) { hasher.combine(runID) }
}

/// What one run did: counts by name, and the error that ended it, if one did.
public struct JobOutcome: Sendable, Equatable {
    public var counts: [String: Int]
    public var error: String?

    public init(counts: [String: Int] = [:], error: String? = nil) {
        self.counts = counts
        self.error = error
    }
}

extension JobSchedule {
    /// The schedule stored as a job's columns; nil when they hold no valid schedule.
    init?(cron: String?, timeZone: String, intervalSeconds: Int?) {
        if let seconds = intervalSeconds {
            self = .every(seconds: seconds)
        } else if let cron, let expression = try? CronExpression(cron), let zone = TimeZone(identifier: timeZone) {
            self = .cron(expression, zone)
        } else {
            return nil
        }
    }
}

extension Database {
    /// Puts jobs whose lease expired back, then leases up to `limit` due jobs to `worker` across
    /// organisations, each with a new run (`claim_jobs`, SECURITY DEFINER). `name` and
    /// `organisation` confine it.
    public func claimJobs(
        worker: String, limit: Int, leaseSeconds: Int, now: Date, organisation: UUID? = nil, name: SystemJob? = nil
    ) async throws -> [ClaimedJob] {
        try await query(
            """
            SELECT organisation_id, job_id, run_id, name, attempt, trigger, scheduled_for, cron, time_zone, interval_seconds
            FROM claim_jobs(\(worker), \(limit)::integer, \(leaseSeconds)::integer, \(now)::timestamptz, \(organisation)::uuid,
                            \(name?.rawValue)::text)
            """
        ).map { row in
            let (org, job, run, name, attempt, trigger, scheduled, cron, zone, interval) = try row.decode(
                (UUID, UUID, UUID, SystemJob, Int, JobTrigger, Date, String?, String, Int?).self, table: "jobs")
            // A schedule the row cannot give (a zone this system lacks) runs daily from now, and says so.
            guard let schedule = JobSchedule(cron: cron, timeZone: zone, intervalSeconds: interval) else {
                logger.warning(
                    "job schedule unusable; running it daily instead",
                    metadata: [
                        "organisation": "\(org.lowercased)", "job": "\(name.rawValue)", "cron": "\(cron ?? "")", "time_zone": "\(zone)",
                    ])
                return ClaimedJob(
                    organisationID: org, jobID: job, runID: run, name: name, attempt: attempt, trigger: trigger, scheduledFor: scheduled,
                    schedule: .every(seconds: 86_400))
            }
            return ClaimedJob(
                organisationID: org, jobID: job, runID: run, name: name, attempt: attempt, trigger: trigger, scheduledFor: scheduled,
                schedule: schedule)
        }
    }
}

private let jobColumns = """
    j.id, j.name, j.cron, coalesce(j.time_zone, o.default_timezone), j.interval_seconds, j.paused, j.status, j.next_run_at,
    j.run_requested_at, j.created_at, r.id, r.trigger, r.scheduled_for, r.attempt, r.worker, r.status, r.started_at, r.finished_at,
    r.duration_ms::int, r.counts, r.error
    """

private let jobFrom = """
    FROM jobs j JOIN organisations o ON o.id = j.organisation_id
    LEFT JOIN job_runs r ON r.organisation_id = j.organisation_id AND r.id = j.last_run_id
    """

private let runColumns =
    "r.id, r.trigger, r.scheduled_for, r.attempt, r.worker, r.status, r.started_at, r.finished_at, r.duration_ms::int, r.counts, r.error"

private func decodeJob(_ row: PostgresRow) throws -> Job {
    let (
        id, name, cron, zone, interval, paused, status, next, requested, created, runID, trigger, scheduled, attempt, worker, runStatus,
        started, finished, duration, counts, error
    ) = try row.decode(
        (
            UUID, SystemJob, String?, String, Int?, Bool, JobStatus, Date, Date?, Date, UUID?, JobTrigger?, Date?, Int?, String?,
            JobRunStatus?, Date?, Date?, Int?, JSONDocument<[String: Int]>?, String?
        ).self, table: "jobs")
    var lastRun: JobRun?
    if let runID, let trigger, let scheduled, let attempt, let worker, let runStatus, let started {
        lastRun = JobRun(
            id: runID, jobID: id, trigger: trigger, scheduledFor: scheduled, attempt: attempt, worker: worker, status: runStatus,
            startedAt: started, finishedAt: finished, durationMilliseconds: duration, counts: counts?.value ?? [:], error: error)
    }
    return Job(
        id: id, name: name, cron: cron, timeZone: zone, intervalSeconds: interval, paused: paused, status: status, nextRunAt: next,
        runRequestedAt: requested, lastRun: lastRun, createdAt: created)
}

private func decodeRun(_ row: PostgresRow, jobID: UUID) throws -> JobRun {
    let (id, trigger, scheduled, attempt, worker, status, started, finished, duration, counts, error) = try row.decode(
        (UUID, JobTrigger, Date, Int, String, JobRunStatus, Date, Date?, Int?, JSONDocument<[String: Int]>, String?).self,
        table: "job_runs")
    return JobRun(
        id: id, jobID: jobID, trigger: trigger, scheduledFor: scheduled, attempt: attempt, worker: worker, status: status,
        startedAt: started, finishedAt: finished, durationMilliseconds: duration, counts: counts.value, error: error)
}

extension TenantTransaction {
    /// Makes the organisation's system jobs it lacks, each on its default schedule from `now`.
    public func ensureSystemJobs(now: Date = Date()) async throws {
        guard let zone = try await query("SELECT default_timezone FROM organisations WHERE id = \(organisationID)").first else {
            throw StoreError.notFound("organisation")
        }
        let timeZone = try zone.decode(String.self, table: "organisations")
        for job in SystemJob.allCases {
            let schedule = JobSchedule(cron: job.defaultCron, timeZone: timeZone, intervalSeconds: job.defaultIntervalSeconds)
            let next = (schedule ?? .every(seconds: 86_400)).next(after: now)
            try await query(
                """
                INSERT INTO jobs (organisation_id, name, cron, interval_seconds, next_run_at)
                VALUES (\(organisationID), \(job.rawValue), \(job.defaultCron), \(job.defaultIntervalSeconds)::integer, \(next))
                ON CONFLICT ON CONSTRAINT jobs_name_unique DO NOTHING
                """)
        }
    }
}

extension TenantTransaction {
    /// The organisation's jobs, by name.
    public func jobs() async throws -> [Job] {
        try await query(
            "SELECT \(unescaped: jobColumns) \(unescaped: jobFrom) WHERE j.organisation_id = \(organisationID) ORDER BY j.name"
        ).map(decodeJob)
    }

    public func job(_ id: UUID) async throws -> Job {
        guard
            let row = try await query(
                "SELECT \(unescaped: jobColumns) \(unescaped: jobFrom) WHERE j.organisation_id = \(organisationID) AND j.id = \(id)"
            ).first
        else { throw StoreError.notFound("job") }
        return try decodeJob(row)
    }

    public func job(named name: SystemJob) async throws -> Job {
        guard
            let row = try await query(
                "SELECT \(unescaped: jobColumns) \(unescaped: jobFrom) WHERE j.organisation_id = \(organisationID) AND j.name = \(name)"
            ).first
        else { throw StoreError.notFound("job") }
        return try decodeJob(row)
    }

    /// A job's runs, newest first.
    public func jobRuns(of jobID: UUID, limit: Int, after cursor: PageCursor?) async throws -> Page<JobRun> {
        _ = try await job(jobID)
        let rows = try await query(
            """
            SELECT \(unescaped: runColumns) FROM job_runs r
            WHERE r.organisation_id = \(organisationID) AND r.job_id = \(jobID)
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (r.started_at, r.id) < ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY r.started_at DESC, r.id DESC
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map { try decodeRun($0, jobID: jobID) }, limit: limit) { PageCursor(time: $0.startedAt, id: $0.id) }
    }

    /// Asks for a run of the job as soon as a worker is free, paused or not; the schedule stays
    /// as it is. Asking again before it starts changes nothing.
    public func requestJobRun(_ id: UUID) async throws -> Job {
        let rows = try await query(
            """
            UPDATE jobs SET run_requested_at = coalesce(run_requested_at, now()), updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("job") }
        return try await job(id)
    }

    /// Computes again, from `now`, the next run of the jobs whose cron follows the
    /// organisation's time zone (after that zone changed).
    public func rescheduleJobs(now: Date) async throws {
        for job in try await jobs() where job.cron != nil {
            guard let schedule = JobSchedule(cron: job.cron, timeZone: job.timeZone, intervalSeconds: nil) else { continue }
            try await query(
                """
                UPDATE jobs SET next_run_at = \(schedule.next(after: now)), updated_at = now()
                WHERE organisation_id = \(organisationID) AND id = \(job.id) AND time_zone IS NULL
                """)
        }
    }

    /// Extends the leases `worker` holds on `claims`.
    public func extendJobLeases(worker: String, claims: [ClaimedJob], leaseSeconds: Int) async throws {
        try await extendLeases(
            .jobs, ids: claims.map(\.jobID), attempts: claims.map(\.attempt), worker: worker, leaseSeconds: leaseSeconds)
    }

    /// Records how a run ended and frees the job, fenced on (worker, attempt); the job's next
    /// run becomes `nextRunAt` when its scheduled time has passed by `now` (a run asked for by
    /// hand leaves a future schedule as it is). False when the fence refused.
    public func completeJobRun(
        _ claim: ClaimedJob, worker: String, outcome: JobOutcome, duration: Duration, now: Date, nextRunAt: Date
    ) async throws -> Bool {
        let rows = try await query(
            """
            WITH job AS (
                UPDATE jobs SET status = 'IDLE', lease_owner = NULL, lease_expires_at = NULL,
                    next_run_at = CASE WHEN next_run_at <= \(now) THEN \(nextRunAt) ELSE next_run_at END, updated_at = now()
                WHERE organisation_id = \(organisationID) AND id = \(claim.jobID) AND lease_owner = \(worker)
                  AND attempts = \(claim.attempt) AND (status = 'RUNNING') IS TRUE -- by key, not by the lease index (0032)
                RETURNING id
            )
            UPDATE job_runs r SET status = \(outcome.error == nil ? JobRunStatus.succeeded : .failed), finished_at = now(),
                duration_ms = \(duration.milliseconds)::bigint, counts = \(JSONDocument(outcome.counts)), error = \(outcome.error)
            FROM job WHERE r.organisation_id = \(organisationID) AND r.id = \(claim.runID) AND r.job_id = job.id
            RETURNING r.id
            """)
        return !rows.isEmpty
    }

    /// The organisation's retention, in days.
    public func retentionDays() async throws -> Int {
        guard let row = try await query("SELECT retention_days FROM organisations WHERE id = \(organisationID)").first else {
            throw StoreError.notFound("organisation")
        }
        return try row.decode(Int.self, table: "organisations")
    }

    /// Deletes up to `limit` rows of one kind of record older than `cutoff` (`RetainedRecords`);
    /// returns how many. Rows of events that something still waits on (a delivery or digest
    /// item not yet final, an event still to come) are kept.
    func deleteRetained(_ records: RetainedRecords, before cutoff: Date, events: [UUID], limit: Int) async throws -> Int {
        try await query(records.deletion(organisation: organisationID, cutoff: cutoff, events: events, limit: limit)).count
    }

    /// Up to `limit` events older than `cutoff` whose rows may all go, oldest first after `after`.
    func retiredEvents(before cutoff: Date, after: PageCursor?, limit: Int) async throws -> [(id: UUID, createdAt: Date)] {
        try await query(
            """
            SELECT e.id, e.created_at FROM events e
            WHERE e.organisation_id = \(organisationID) AND e.created_at < \(cutoff) AND e.deliver_at < \(cutoff)
              AND (\(after?.micros)::bigint IS NULL
                   OR (e.created_at, e.id) > ('epoch'::timestamptz + \(after?.micros) * interval '1 microsecond', \(after?.id)))
              AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.organisation_id = e.organisation_id AND d.event_id = e.id
                              AND d.status IN ('PENDING', 'SENDING', 'FAILED'))
              AND NOT EXISTS (SELECT 1 FROM digest_items i WHERE i.organisation_id = e.organisation_id AND i.event_id = e.id
                              AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.dropped_reason IS NULL)
            ORDER BY e.created_at, e.id
            LIMIT \(limit)
            """
        ).map { row in
            let (id, created) = try row.decode((UUID, Date).self, table: "events")
            return (id, created)
        }
    }

    /// Deletes up to `limit` in-app notifications whose expiry has passed by `now`; returns how many.
    public func purgeExpiredNotifications(now: Date, limit: Int) async throws -> Int {
        try await query(
            """
            DELETE FROM notifications WHERE organisation_id = \(organisationID) AND id IN (
                SELECT id FROM notifications WHERE organisation_id = \(organisationID) AND expires_at <= \(now) LIMIT \(limit))
            RETURNING 1
            """
        ).count
    }
}

/// The kinds of record retention deletes, in the order it deletes them (children first, so no
/// statement cascades into an unbounded number of rows).
enum RetainedRecords: String, CaseIterable {
    // Of the events in a batch:
    case linkClicks = "link_clicks"
    case deliveryAttempts = "delivery_attempts"
    case deliveries
    case digestItems = "digest_items"
    case notifications
    case decisionTraces = "decision_traces"
    case events
    // By their own time:
    case digestRuns = "digest_runs"
    case jobRuns = "job_runs"

    var ofEvents: Bool { self != .digestRuns && self != .jobRuns }

    /// One bounded DELETE of these records of `events` (or, for runs, older than `cutoff`).
    func deletion(organisation: UUID, cutoff: Date, events: [UUID], limit: Int) -> PostgresQuery {
        switch self {
        case .linkClicks:
            """
            DELETE FROM link_clicks WHERE organisation_id = \(organisation) AND id IN (
                SELECT c.id FROM link_clicks c WHERE c.organisation_id = \(organisation) AND (
                    c.delivery_id IN (SELECT d.id FROM deliveries d WHERE d.organisation_id = \(organisation) AND d.event_id = ANY(\(events)))
                    OR c.digest_item_id IN (SELECT i.id FROM digest_items i WHERE i.organisation_id = \(organisation) AND i.event_id = ANY(\(events))))
                LIMIT \(limit))
            RETURNING 1
            """
        case .deliveryAttempts:
            """
            DELETE FROM delivery_attempts WHERE (organisation_id, delivery_id, attempt) IN (
                SELECT a.organisation_id, a.delivery_id, a.attempt FROM delivery_attempts a
                JOIN deliveries d ON d.organisation_id = a.organisation_id AND d.id = a.delivery_id
                WHERE a.organisation_id = \(organisation) AND d.event_id = ANY(\(events)) LIMIT \(limit))
            RETURNING 1
            """
        case .deliveries, .digestItems, .notifications:
            """
            DELETE FROM \(unescaped: rawValue) WHERE organisation_id = \(organisation) AND id IN (
                SELECT id FROM \(unescaped: rawValue) WHERE organisation_id = \(organisation) AND event_id = ANY(\(events)) LIMIT \(limit))
            RETURNING 1
            """
        case .decisionTraces:
            """
            DELETE FROM event_recipients WHERE (organisation_id, event_id, user_id) IN (
                SELECT organisation_id, event_id, user_id FROM event_recipients
                WHERE organisation_id = \(organisation) AND event_id = ANY(\(events)) LIMIT \(limit))
            RETURNING 1
            """
        case .events:
            "DELETE FROM events WHERE organisation_id = \(organisation) AND id = ANY(\(events)) RETURNING 1"
        case .digestRuns:
            """
            DELETE FROM digest_runs WHERE organisation_id = \(organisation) AND id IN (
                SELECT id FROM digest_runs WHERE organisation_id = \(organisation) AND slot_at < \(cutoff)
                  AND status IN ('SENT', 'DEAD', 'EMPTY') LIMIT \(limit))
            RETURNING 1
            """
        case .jobRuns:
            """
            DELETE FROM job_runs WHERE organisation_id = \(organisation) AND id IN (
                SELECT id FROM job_runs WHERE organisation_id = \(organisation) AND started_at < \(cutoff) AND status <> 'RUNNING'
                LIMIT \(limit))
            RETURNING 1
            """
        }
    }
}

extension Database {
    /// Deletes, in `organisation`, what is older than its retention at `now`, in bounded batches
    /// (each its own short transaction: no long transaction, no table lock): the events and
    /// every row recorded about them, then old digest and job runs. Returns the rows deleted by
    /// kind; `progress` hears the running totals after each batch of events.
    public func applyRetention(
        organisation: UUID, now: Date, batch: Int = 2_000, progress: ([String: Int]) -> Void = { _ in }
    ) async throws -> [String: Int] {
        let days = try await withTenant(organisation) { tx in try await tx.retentionDays() }
        let cutoff = now.addingTimeInterval(-TimeInterval(days) * 86_400)
        var counts = Dictionary(uniqueKeysWithValues: RetainedRecords.allCases.map { ($0.rawValue, 0) })
        var after: PageCursor?
        while true {
            let events = try await withTenant(organisation) { tx in
                try await tx.retiredEvents(before: cutoff, after: after, limit: max(1, batch / 20))
            }
            guard let last = events.last else { break }
            after = PageCursor(time: last.createdAt, id: last.id)
            let ids = events.map(\.id)
            for records in RetainedRecords.allCases where records.ofEvents {
                counts[records.rawValue, default: 0] += try await deleteInBatches(records, organisation, cutoff, ids, batch)
            }
            progress(counts)
        }
        for records in RetainedRecords.allCases where !records.ofEvents {
            counts[records.rawValue, default: 0] += try await deleteInBatches(records, organisation, cutoff, [], batch)
        }
        return counts
    }

    private func deleteInBatches(
        _ records: RetainedRecords, _ organisation: UUID, _ cutoff: Date, _ events: [UUID], _ batch: Int
    ) async throws -> Int {
        var total = 0
        while true {
            let deleted = try await withTenant(organisation) { tx in
                try await tx.deleteRetained(records, before: cutoff, events: events, limit: batch)
            }
            total += deleted
            if deleted < batch || records == .events { return total }
        }
    }
}

extension Database {
    /// Deletes `organisation`'s in-app notifications whose expiry has passed by `now`, `batch`
    /// at a time; returns how many.
    public func purgeExpired(organisation: UUID, now: Date, batch: Int) async throws -> Int {
        var total = 0
        while true {
            let removed = try await withTenant(organisation) { tx in try await tx.purgeExpiredNotifications(now: now, limit: batch) }
            total += removed
            if removed < batch { return total }
        }
    }
}
