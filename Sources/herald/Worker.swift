import ArgumentParser
import Foundation
import HeraldAPI
import HeraldCore
import HeraldDelivery
import HeraldStore
import Logging
import Metrics
import PostgresNIO
import Prometheus
import ServiceLifecycle
import UnixSignals

/// `herald worker`: the delivery workers without the HTTP API.
struct Worker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Deliver the outbox (email, webhooks, chat) until SIGTERM or SIGINT, without serving the API.")

    func run() async throws {
        var config = try AppConfiguration.fromEnvironment()
        if config.workers == 0 { config.workers = AppConfiguration().workers }
        bootstrapLogging(config)
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()))
        let logger = Logger(label: "herald.worker")
        let delivery = try DeliveryServices(config, linkKeys: try config.linkKeyRing(), logger: logger)
        guard delivery.workers > 0 else {
            throw ValidationError("DATABASE_WORKER_URL is not set: the workers connect as the worker role (herald_worker).")
        }
        let group = ServiceGroup(configuration: .init(
            services: delivery.services.map { .init(service: $0) }, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        logger.info("herald worker started", metadata: ["workers": "\(delivery.workers)"])
        try await group.run()
        try await delivery.shutdown()
    }
}

/// The worker role's PostgreSQL pool and the delivery worker pool, as services; empty when
/// `HERALD_WORKERS=0` or no worker database URL is configured.
struct DeliveryServices {
    var services: [any Service] = []
    var workers = 0
    private var transport: HTTPTransport?

    init(_ config: AppConfiguration, linkKeys: LinkKeyRing, logger: Logger) throws {
        guard config.workers > 0 else { return }
        guard let url = config.workerDatabaseURL else {
            logger.warning("DATABASE_WORKER_URL is not set: no delivery workers in this process")
            return
        }
        guard let smtp = EmailTransport.settings(url: config.smtpURL, username: config.smtpUsername, password: config.smtpPassword,
                                                 timeout: config.smtpTimeout) else {
            throw ConfigurationError(variable: "HERALD_SMTP_URL", value: config.smtpURL)
        }
        var pool = try PostgresClient.Configuration.fromURL(url)
        // One connection per send in flight, one for LISTEN, one for claims and heartbeats.
        pool.options.maximumConnections = config.workers + 2
        let postgres = PostgresClient(configuration: pool, backgroundLogger: logger)
        let http = HTTPTransport(destinations: try config.destinationGuard(), timeout: .milliseconds(Int64(config.webhookTimeout * 1000)))
        var worker = WorkerPoolConfiguration()
        worker.concurrency = config.workers
        worker.batchSize = config.workerBatchSize
        worker.leaseSeconds = config.workerLeaseSeconds
        worker.pollInterval = .milliseconds(config.workerPollMilliseconds)
        worker.organisation = config.workerOrganisation
        worker.retry = RetryPolicy(baseDelay: config.retryBaseSeconds, factor: config.retryFactor, maximumDelay: config.retryMaxSeconds,
                                   jitter: config.retryJitter)
        let sender = DeliverySender(
            email: EmailTransport(settings: smtp, defaultFrom: config.smtpFrom), http: http,
            links: LinkBuilder(baseURL: config.linkBaseURL, keys: linkKeys))
        services = [postgres, DeliveryWorkerPool(configuration: worker, database: Database(client: postgres, logger: logger),
                                                 listenClient: postgres, sender: sender, logger: logger)]
        workers = config.workers
        transport = http
    }

    func shutdown() async throws {
        try await transport?.shutdown()
    }
}
