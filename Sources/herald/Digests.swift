import ArgumentParser
import Foundation
import HeraldAPI
import HeraldCore
import HeraldDelivery
import HeraldStore
import Logging
import PostgresNIO

/// `herald digests send`: sends every digest whose slot has come, for operators who run their
/// own cron instead of a long-running `herald worker` (which sends them as they come due).
struct DigestsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "digests", abstract: "Send the digests that are due, or list them.", subcommands: [Send.self])

    struct Send: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send every digest whose slot has come, printing progress; --dry-run lists them and sends nothing.")

        @Flag(help: "List what is due (organisation, user, frequency, slot, items) and send nothing.")
        var dryRun = false

        @Option(
            help: ArgumentHelp(
                "Act as if it were this instant (RFC 3339, e.g. 2026-12-03T08:01:00Z): send or list what is due by then.",
                discussion: "For catching up after an outage, and for trying digests without waiting for their hour."))
        var at: String?

        func run() async throws {
            let config = try AppConfiguration.fromEnvironment()
            let logger = Logger(label: "herald.digests")
            var now = Date()
            if let at {
                guard let instant = try? Date(at, strategy: .iso8601) else {
                    throw ValidationError("--at \(at) is not an RFC 3339 instant such as 2026-12-03T08:01:00Z.")
                }
                now = instant
            }
            if dryRun {
                try await list(now: now, organisation: config.workerOrganisation, logger: logger)
            } else {
                try await send(config, now: now, logger: logger)
            }
        }

        /// As the owner role, organisation by organisation (only it can list them), reading only;
        /// one organisation when `HERALD_WORKER_ORGANISATION` confines the send to it.
        func list(now: Date, organisation only: UUID?, logger: Logger) async throws {
            guard let url = ProcessInfo.processInfo.environment["DATABASE_OWNER_URL"], !url.isEmpty else {
                throw ValidationError(
                    "DATABASE_OWNER_URL is not set: listing walks every organisation, which only the owner role can list.")
            }
            try await withPostgres(url: url, variable: "DATABASE_OWNER_URL", logger: logger) { client in
                let database = Database(client: client, logger: logger)
                var digests = 0
                var items = 0
                let organisations = try await database.allOrganisationIDs().filter { only == nil || $0 == only }
                for organisation in organisations {
                    for due in try await database.withTenant(organisation, { tx in try await tx.dueDigests(now: now) }) {
                        let retry = due.attempts > 0 ? " (a retry: \(due.attempts) attempt(s) so far)" : ""
                        print(
                            "due: organisation \(organisation.lowercased) \(due.email) \(due.frequency.rawValue) slot \(due.slotAt.formatted(.iso8601)): \(due.items) item(s)\(retry)"
                        )
                        digests += 1
                        items += due.items
                    }
                }
                print("digests send --dry-run: \(digests) digest(s) due with \(items) item(s); nothing sent")
            }
        }

        /// As the worker role, through the same claim, lease and fence as `herald worker`.
        func send(_ config: AppConfiguration, now: Date, logger: Logger) async throws {
            guard let url = config.workerDatabaseURL else {
                throw ValidationError("DATABASE_WORKER_URL is not set: digests are sent as the worker role (herald_worker).")
            }
            guard
                let smtp = EmailTransport.settings(
                    url: config.smtpURL, username: config.smtpUsername, password: config.smtpPassword, timeout: config.smtpTimeout)
            else { throw ValidationError("HERALD_SMTP_URL is not an smtp:// or smtps:// URL: \(config.smtpURL)") }
            // Not a key of this process alone: every unsubscribe link of the digests sent here
            // would be dead, and a sent digest is not sent again.
            let links = LinkBuilder(baseURL: config.linkBaseURL, keys: try config.sharedLinkKeyRing(for: "the digests sent"))
            try await withPostgres(url: url, variable: "DATABASE_WORKER_URL", logger: logger) { client in
                let database = config.database(client, logger: logger)
                var runner = WorkRunnerConfiguration(name: "cli:" + WorkerPoolConfiguration.defaultName())
                runner.leaseSeconds = config.workerLeaseSeconds
                runner.batchSize = 16
                let digests = WorkRunner(
                    configuration: runner, queue: DigestQueue(database: database, organisation: config.workerOrganisation, now: { now }),
                    handler: DigestHandler(
                        database: database, email: EmailTransport(settings: smtp, defaultFrom: config.smtpFrom, threads: runner.batchSize),
                        links: links,
                        retry: RetryPolicy(
                            baseDelay: config.retryBaseSeconds, factor: config.retryFactor, maximumDelay: config.retryMaxSeconds,
                            jitter: config.retryJitter), worker: runner.name, now: { now }),
                    bus: NotificationBus(client: client, logger: logger), logger: logger)
                print("digests send: sending what is due now; \(config.linkBaseNote)")
                let total = try await digests.runDue { batch, total in print("digests send: \(batch) run(s) done (\(total) so far)") }
                print("digests send: \(total) run(s) attempted; see GET /v1/events/{id}/explain or the logs for each outcome")
            }
        }
    }
}
