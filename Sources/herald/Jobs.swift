import ArgumentParser
import Foundation
import HeraldAPI
import HeraldCore
import HeraldDelivery
import HeraldStore
import Logging
import PostgresNIO

/// `herald jobs list` and `herald jobs run NAME`: the scheduled jobs of every organisation, for
/// operators (a long-running `herald serve` or `herald worker` runs them as they come due).
/// Both walk every organisation, so both run as the owner role.
struct JobsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "jobs", abstract: "List the scheduled jobs, or run one now.", subcommands: [List.self, Run.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List every organisation's jobs: schedule, next run, and how the last run ended.")

        @Option(help: "Only this organisation (its id or slug).") var organisation: String?

        func run() async throws {
            try await withOwnerDatabase { database, _, _ in
                for id in try await organisations(database, only: organisation) {
                    for job in try await database.withTenant(id, { tx in try await tx.jobs() }) {
                        print(describe(job, organisation: id))
                    }
                }
            }
        }
    }

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a job now in every organisation (or one), printing progress; its schedule stays as it is.",
            discussion: "Jobs: \(SystemJob.allCases.map(\.rawValue).joined(separator: ", ")).")

        @Argument(help: "The job: \(SystemJob.allCases.map(\.rawValue).joined(separator: ", ")).") var name: String
        @Option(help: "Only this organisation (its id or slug).") var organisation: String?

        func run() async throws {
            guard let job = SystemJob(rawValue: name) else {
                throw ValidationError(
                    "No job is called '\(name)'; the jobs are \(SystemJob.allCases.map(\.rawValue).joined(separator: ", ")).")
            }
            try await runNow(job, organisation: organisation, label: "jobs run \(job.rawValue)")
        }
    }
}

/// `herald maintenance inactivity`: the inactivity sweep now, for operators who run their own cron.
struct MaintenanceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "maintenance", abstract: "Run a maintenance sweep now.", subcommands: [Inactivity.self])

    struct Inactivity: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Warn users who have not engaged for their organisation's inactivity period, and switch off the email of those warned and still silent (organisations whose rule is on)."
        )

        @Option(help: "Only this organisation (its id or slug).") var organisation: String?
        @Option(help: "Act as if it were this instant (RFC 3339), e.g. to try the rule without waiting a year.") var at: String?

        func run() async throws {
            var now: Date?
            if let at {
                guard let instant = try? Date(at, strategy: .iso8601) else {
                    throw ValidationError("--at \(at) is not an RFC 3339 instant such as 2027-12-03T08:01:00Z.")
                }
                now = instant
            }
            try await runNow(.inactivity, organisation: organisation, label: "maintenance inactivity", now: now)
        }
    }
}

/// Asks for a run of `job` in every organisation (or one) and runs them here, through the same
/// claim, lease and fence as the workers, printing progress and each organisation's outcome.
/// The inactivity rule's warnings go through HERALD_SMTP_URL, with links signed by HERALD_LINK_KEYS.
private func runNow(_ job: SystemJob, organisation: String?, label: String, now: Date? = nil) async throws {
    let tryingAt = now
    let now = now ?? Date()
    let config = try AppConfiguration.fromEnvironment()
    var mailer: InactivityMailer?
    // Warnings carry a "keep me subscribed" link: with a key of this process alone it would be dead.
    let keys = job == .inactivity ? try config.sharedLinkKeyRing(for: "the inactivity warnings") : try config.linkKeyRing()
    if let smtp = EmailTransport.settings(
        url: config.smtpURL, username: config.smtpUsername, password: config.smtpPassword, timeout: config.smtpTimeout)
    {
        mailer = InactivityMailer(
            email: EmailTransport(settings: smtp, defaultFrom: config.smtpFrom), links: LinkBuilder(baseURL: config.linkBaseURL, keys: keys)
        )
        if job == .inactivity { print("\(label): \(config.linkBaseNote)") }
    }
    try await withOwnerDatabase { [mailer] database, client, logger in
        let targets = try await organisations(database, only: organisation)
        // Audited in each organisation as a run asked for through the API is, naming the operator.
        let request = commandRequestID(label)
        for id in targets {
            try await database.withTenant(id, requestID: request) { tx in
                try await tx.ensureSystemJobs()
                let asked = try await tx.job(named: job).id
                _ = try await tx.requestJobRun(asked)
                try await tx.audit(
                    action: "job.run", targetType: "job", targetID: asked.lowercased, before: nil,
                    after: tryingAt.map { .object(["trying_at": .string($0.formatted(.iso8601))]) })
            }
        }
        print("\(label): asked for a run in \(targets.count) organisation(s)")
        var runner = WorkRunnerConfiguration(name: "cli:" + WorkerPoolConfiguration.defaultName())
        runner.leaseSeconds = config.workerLeaseSeconds
        runner.batchSize = 4
        runner.attemptDeadline = .seconds(24 * 3600)
        // Runs are claimed and recorded on the real clock, so that an instant given to try the rule
        // (`--at`, a year ahead) neither runs the scheduled run early nor moves the schedule past
        // that instant; only the runs this command asked for act as if it were then. Any other
        // run the claim takes (due now for real, or asked for through the API) runs at the real time.
        let jobs = WorkRunner(
            configuration: runner,
            queue: JobQueue(database: database, organisation: targets.count == 1 ? targets.first : nil, name: job, now: { Date() }),
            handler: TryingAt(
                trying: JobHandler(database: database, mailer: mailer, now: { now }),
                real: JobHandler(database: database, mailer: mailer), organisations: Set(targets)),
            bus: NotificationBus(client: client, logger: logger), logger: logger)
        let total = try await jobs.runDue { batch, total in
            print("\(label): \(batch) organisation(s) done (\(total) so far)")
        }
        for id in targets {
            if let run = try await database.withTenant(id, { tx in try await tx.job(named: job) }).lastRun {
                print("  organisation \(id.lowercased): \(describe(run))")
            }
        }
        print("\(label): \(total) run(s) finished")
    }
}

/// A job handler for a command's runs: the ones it asked for (MANUAL, in its organisations) act at
/// the command's instant, any other at the real time.
private struct TryingAt: WorkHandler {
    let trying: JobHandler
    let real: JobHandler
    let organisations: Set<UUID>

    func handle(_ claim: ClaimedJob, logger: Logger) async throws -> WorkDisposition<JobOutcome> {
        let asked = claim.trigger == .manual && organisations.contains(claim.organisationID)
        return try await (asked ? trying : real).handle(claim, logger: logger)
    }

    func finished(_ claim: ClaimedJob, disposition: WorkDisposition<JobOutcome>?, recorded: Bool?, duration: Duration, logger: Logger) {
        real.finished(claim, disposition: disposition, recorded: recorded, duration: duration, logger: logger)
    }
}

/// Runs `body` over the owner role's pool (DATABASE_OWNER_URL).
private func withOwnerDatabase(
    _ body: @Sendable (_ database: Database, _ client: PostgresClient, _ logger: Logger) async throws -> Void
) async throws {
    guard let url = ProcessInfo.processInfo.environment["DATABASE_OWNER_URL"], !url.isEmpty else {
        throw ValidationError("DATABASE_OWNER_URL is not set: jobs walk every organisation, which only the owner role can list.")
    }
    let logger = Logger(label: "herald.jobs")
    try await withPostgres(url: url, variable: "DATABASE_OWNER_URL", logger: logger) { client in
        try await body(Database(client: client, logger: logger), client, logger)
    }
}

/// Every organisation, or the one named by id or slug.
private func organisations(_ database: Database, only: String?) async throws -> [UUID] {
    guard let only else { return try await database.allOrganisationIDs() }
    if let id = UUID(uuidString: only) { return [id] }
    guard let id = try await database.organisationID(slug: only) else {
        throw ValidationError("No organisation has the id or slug '\(only)'.")
    }
    return [id]
}

private func describe(_ job: Job, organisation: UUID) -> String {
    let schedule = job.cron.map { "cron '\($0)' \(job.timeZone)" } ?? "every \(job.intervalSeconds ?? 0) s"
    var line = "\(organisation.lowercased) \(job.name.rawValue): \(schedule), next \(job.nextRunAt.formatted(.iso8601))"
    if job.paused { line += " (paused)" }
    if job.status == .running { line += ", running now" }
    if job.runRequestedAt != nil { line += ", a run is asked for" }
    line += "; last run: " + (job.lastRun.map(describe) ?? "none")
    return line
}

private func describe(_ run: JobRun) -> String {
    var text = "\(run.status.rawValue) \(run.trigger.rawValue.lowercased()) at \(run.startedAt.formatted(.iso8601))"
    if let milliseconds = run.durationMilliseconds { text += " in \(milliseconds) ms" }
    let counts = run.counts.filter { $0.value > 0 }.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
    text += counts.isEmpty ? ", nothing to do" : ", " + counts.joined(separator: ", ")
    if let error = run.error { text += ", error: \(error)" }
    return text
}

/// What the audit log records as the request of a command run by an operator: the command and
/// who ran it where (`cli herald jobs run retention by alice@ops-1`), for the `request_id` of its
/// entries, whose actor is `system`.
func commandRequestID(_ command: String) -> String {
    let environment = ProcessInfo.processInfo.environment
    let user = environment["SUDO_USER"] ?? environment["USER"] ?? environment["LOGNAME"] ?? "uid \(getuid())"
    return "cli herald \(command) by \(user)@\(ProcessInfo.processInfo.hostName)"
}
