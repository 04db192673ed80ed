import ArgumentParser
import Foundation
import HeraldAPI
import HeraldCore
import HeraldDelivery
import HeraldStore
import Hummingbird
import Logging
import Metrics
import PostgresNIO
import Prometheus
import ServiceLifecycle
import UnixSignals

/// `herald worker`: the delivery workers without the HTTP API.
struct Worker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Deliver the outbox (email, webhooks, chat), send digests and run scheduled jobs until SIGTERM or SIGINT, without serving the API."
    )

    func run() async throws {
        var config = try AppConfiguration.fromEnvironment()
        if config.workers == 0 { config.workers = AppConfiguration().workers }
        bootstrapLogging(config)
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        MetricsAtZero.register()
        let logger = Logger(label: "herald.worker")
        runTasksOnEventLoops(config, logger: logger)
        // No bus given: the workers' own pool lends one connection to the process's bus.
        warnOfProcessLinkKeys(config, logger: logger)
        let delivery = try DeliveryServices(config, linkKeys: try config.linkKeyRing(), bus: nil, logger: logger)
        try await delivery.whileRunning {
            guard delivery.workers > 0 else {
                throw ValidationError("DATABASE_WORKER_URL is not set: the workers connect as the worker role (herald_worker).")
            }
            // Listed first: it stops last, so the final figures can still be scraped while the pool drains.
            let metrics: [any Service] = config.workerMetricsPort > 0 ? [metricsServer(registry, config: config, logger: logger)] : []
            logger.info(
                "herald worker started",
                metadata: [
                    "workers": "\(delivery.workers)",
                    "metrics_port": "\(config.workerMetricsPort > 0 ? "\(config.workerMetricsPort)" : "none")",
                ])
            try await runUntilSignalled(
                metrics + delivery.services + delivery.roleCheck(logger: logger), shutdownSeconds: config.shutdownSeconds, logger: logger)
        }
    }
}

/// The worker's own HTTP server: `GET /metrics` (Prometheus text, the same metrics the workers
/// record inside `herald serve`) and `GET /healthz`, nothing else.
private func metricsServer(_ registry: PrometheusCollectorRegistry, config: AppConfiguration, logger: Logger) -> some Service {
    let router = Router()
    let metrics = HTTPMetrics(registry: registry)
    router.get("/metrics") { _, _ -> Response in
        Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: metrics.render())))
    }
    router.get("/healthz") { _, _ -> Response in
        Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: #"{"status":"ok"}"#)))
    }
    return Application(
        router: router, configuration: .init(address: .hostname(config.host, port: config.workerMetricsPort), serverName: "herald-worker"),
        logger: logger)
}

/// The worker role's PostgreSQL pool and the delivery worker pool, as services; empty when
/// `HERALD_WORKERS=0` or no worker database URL is configured. The workers wake on `bus`, the
/// process's one notification bus; without one (`herald worker`) they bring their own, over
/// the worker role's pool, listed between that pool and the workers so it stops after them.
struct DeliveryServices {
    var services: [any Service] = []
    var workers = 0
    private var transport: HTTPTransport?
    /// The worker role's pool, for `roleCheck`.
    private var client: PostgresClient?
    static let jobConcurrency = 2

    init(_ config: AppConfiguration, linkKeys: LinkKeyRing, bus: NotificationBus?, logger: Logger) throws {
        guard config.workers > 0 else { return }
        guard let url = config.workerDatabaseURL else {
            logger.warning("DATABASE_WORKER_URL is not set: no delivery workers in this process")
            return
        }
        guard
            let smtp = EmailTransport.settings(
                url: config.smtpURL, username: config.smtpUsername, password: config.smtpPassword,
                timeout: config.smtpTimeout)
        else {
            throw ConfigurationError(variable: "HERALD_SMTP_URL", value: config.smtpURL)
        }
        var pool = try PostgresClient.Configuration.fromURL(url)
        pool.keepAlive(every: config.databaseKeepAlive)
        // The deliveries' shared connections (a send holds none: the sends starting or ending
        // together are read, recorded or given back in one transaction per organisation; more
        // requests wait for a free connection), one for the bus's LISTEN (when it is ours), one
        // for claims and heartbeats. Digest runs (issue 11): HERALD_DIGEST_WORKERS, else a quarter
        // of the sends in flight, room for one each (a run reads and records with one, and sends
        // with none; while some runs are recorded others may read, as the runner holds up to twice
        // its slots, and those wait for a connection). Scheduled jobs: two at a time, one each. The
        // backlog's gauges: one.
        let digestConcurrency = config.digestConcurrency
        pool.options.maximumConnections =
            config.deliveryConnections + digestConcurrency + 2 + Self.jobConcurrency + (config.backlogSeconds > 0 ? 1 : 0)
        let postgres = PostgresClient(configuration: pool, backgroundLogger: logger)
        // As many connections per host as sends in flight: no send waits for a connection.
        let http = HTTPTransport(
            destinations: try config.destinationGuard(), timeout: .milliseconds(Int64(config.webhookTimeout * 1000)),
            connectionsPerHost: config.workers)
        var worker = WorkerPoolConfiguration()
        worker.concurrency = config.workers
        worker.batchSize = config.workerBatchSize
        worker.leaseSeconds = config.workerLeaseSeconds
        worker.pollInterval = .milliseconds(config.workerPollMilliseconds)
        worker.organisation = config.workerOrganisation
        // Reading, sending and recording: three database calls and a send, with room to spare.
        let send = max(config.webhookTimeout + 5, config.smtpTimeout)
        worker.attemptDeadline = .milliseconds(Int64((3 * config.databaseTimeout + send + 10) * 1000))
        worker.endpointConcurrency = config.endpointConcurrency
        worker.circuitFailures = config.circuitFailures
        worker.circuitCooldown = config.circuitCooldownSeconds
        worker.retry = RetryPolicy(
            baseDelay: config.retryBaseSeconds, factor: config.retryFactor, maximumDelay: config.retryMaxSeconds,
            jitter: config.retryJitter)
        // Each email being sent holds one of HERALD_SMTP_CONNECTIONS; more wait for one.
        // The SMTP server's circuit breaker: the endpoints' rule, in memory (docs/delivery.md).
        let email = EmailTransport(
            settings: smtp, defaultFrom: config.smtpFrom, threads: min(config.workers + digestConcurrency, config.smtpConnections),
            relay: RelayCircuit(threshold: config.circuitFailures, cooldown: config.circuitCooldownSeconds))
        let links = LinkBuilder(baseURL: config.linkBaseURL, keys: linkKeys)
        let sender = DeliverySender(email: email, http: http, links: links)
        var ownBus: [any Service] = []
        let processBus: NotificationBus
        if let bus {
            processBus = bus
        } else {
            processBus = NotificationBus(client: postgres, logger: logger)
            ownBus = [processBus]
        }
        let database = config.database(postgres, logger: logger)
        let deliveryPool = DeliveryWorkerPool(configuration: worker, database: database, bus: processBus, sender: sender, logger: logger)
        // The second kind of work on the same runner: digest runs, due as their slots come.
        var digestRunner = WorkRunnerConfiguration(name: worker.name + ":digest")
        digestRunner.concurrency = digestConcurrency
        digestRunner.batchSize = max(1, min(config.workerBatchSize, digestConcurrency * 2))
        digestRunner.leaseSeconds = config.workerLeaseSeconds
        digestRunner.pollInterval = .milliseconds(config.workerPollMilliseconds)
        digestRunner.attemptDeadline = worker.attemptDeadline
        let digests = WorkRunner(
            configuration: digestRunner, queue: DigestQueue(database: database, organisation: config.workerOrganisation),
            handler: DigestHandler(database: database, email: email, links: links, retry: worker.retry, worker: digestRunner.name),
            bus: processBus, logger: logger)
        // The third: scheduled jobs (retention, purge of expired rows), one instance per due run.
        var jobRunner = WorkRunnerConfiguration(name: worker.name + ":job")
        jobRunner.concurrency = Self.jobConcurrency
        jobRunner.batchSize = Self.jobConcurrency
        jobRunner.leaseSeconds = config.workerLeaseSeconds
        jobRunner.pollInterval = .milliseconds(max(1_000, config.workerPollMilliseconds))
        // Retention of a large organisation takes a while; its lease is extended all along.
        jobRunner.attemptDeadline = .seconds(6 * 3600)
        let jobs = WorkRunner(
            configuration: jobRunner, queue: JobQueue(database: database, organisation: config.workerOrganisation),
            handler: JobHandler(database: database, mailer: InactivityMailer(email: email, links: links)), bus: processBus, logger: logger)
        // The backlog's gauges, read over the same pool (one connection every HERALD_BACKLOG_SECONDS).
        let backlog: [any Service] =
            config.backlogSeconds > 0
            ? [BacklogProbe(database: database, interval: .milliseconds(Int64(config.backlogSeconds * 1000)), logger: logger)] : []
        services = [postgres] + ownBus + [deliveryPool, digests, jobs] + backlog
        workers = config.workers
        transport = http
        client = postgres
    }

    func shutdown() async throws {
        try await transport?.shutdown()
    }

    /// The check that the workers' role may claim work and bypasses nothing (empty without workers).
    func roleCheck(logger: Logger) -> [any Service] {
        client.map { [DatabaseRoleCheck(client: $0, needs: .worker, variable: "DATABASE_WORKER_URL", logger: logger)] } ?? []
    }

    /// Runs `body`, then shuts the services' HTTP client down, whether `body` returned or threw:
    /// AsyncHTTPClient stops the process when a client is released without a shutdown, so a
    /// start-up that failed after the services were made (a bad JWT key directory, a port in
    /// use) crashed with its backtrace instead of saying why (a trial).
    func whileRunning(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch {
            try? await shutdown()
            throw error
        }
        try await shutdown()
    }
}

extension AppConfiguration {
    /// The store over `client`, with the configured deadline on every call.
    /// `connectionWait`: how long a call waits for a pooled connection before it gives up (the
    /// API's requests: 10 s, so that an outage answers 503 before a graceful shutdown ends);
    /// nil: the whole deadline (work runners, which retry, and whose loss costs more).
    func database(_ client: PostgresClient, logger: Logger, connectionWait: Duration? = nil) -> Database {
        Database(
            client: client, logger: logger, deadline: .milliseconds(Int64(databaseTimeout * 1000)), connectionWait: connectionWait,
            preparedStatements: preparedStatements)
    }
}

/// Runs `services` until SIGTERM or SIGINT, and exits within `shutdownSeconds` of the signal
/// whatever hangs (issue 8, item 11): four fifths of it for a graceful drain, then the
/// services are cancelled, and at the end the process exits with status 2.
func runUntilSignalled(_ services: [any Service], shutdownSeconds: Double, logger: Logger) async throws {
    let reported: [any Service] = services.map { FailureReported(service: $0, logger: logger) }
    let all: [any Service] = reported + [ShutdownDeadline(seconds: shutdownSeconds, logger: logger)]
    var configuration = ServiceGroupConfiguration(
        services: all.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) },
        gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    configuration.maximumGracefulShutdownDuration = .milliseconds(Int64(shutdownSeconds * 800))
    try await ServiceGroup(configuration: configuration).run()
    logger.info("stopped")
}

/// A service whose failure is logged as it happens, naming the service: the group then shuts the
/// others down, and the reason came only after "shutting down" before (a port in use, a trial).
struct FailureReported: Service, CustomStringConvertible {
    let service: any Service
    let logger: Logger

    /// The service's type without its generic parameters (`Application`, `PostgresClient`).
    var description: String { String(String(describing: type(of: service)).prefix { $0 != "<" }) }

    func run() async throws {
        do {
            try await service.run()
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            logger.error("\(description) failed: shutting down", metadata: ["error": "\(String(describing: error))"])
            throw error
        }
    }
}

/// The last resort of a bounded shutdown. Listed last, it hears of the shutdown first (a
/// group shuts its services down in reverse order), starts a timer on a thread of its own
/// (the cooperative pool may be the thing that is stuck) and returns at once.
struct ShutdownDeadline: Service {
    let seconds: Double
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        logger.info("shutting down: finishing what is in flight", metadata: ["shutdown_seconds": "\(seconds)"])
        let seconds = seconds, logger = logger
        Thread.detachNewThread {
            Thread.sleep(forTimeInterval: seconds)
            logger.critical("shutdown did not finish in time; exiting", metadata: ["shutdown_seconds": "\(seconds)"])
            exit(2)
        }
    }
}

/// Without `HERALD_LINK_KEYS` a process signs its links with a key of its own: they work while it
/// runs, on it alone (one instance, a demo), and are dead after a restart or on another instance.
func warnOfProcessLinkKeys(_ config: AppConfiguration, logger: Logger) {
    guard config.linkKeys == nil else { return }
    logger.warning(
        """
        HERALD_LINK_KEYS is not set: this process signs its links (unsubscribe, tracked links) with a key of its own; \
        they stop working when it restarts and on other instances
        """)
}
