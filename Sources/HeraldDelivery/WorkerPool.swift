import Foundation
import HeraldCore
import HeraldStore
import Logging
import ServiceLifecycle

/// How a pool of delivery workers behaves.
public struct WorkerPoolConfiguration: Sendable {
    /// Deliveries sent at once; as many again may wait for their attempt's recording.
    public var concurrency = 16
    /// Most deliveries claimed in one round trip.
    public var batchSize = 32
    /// How long a claim holds a delivery; the heartbeat extends it every third of that.
    public var leaseSeconds = 60
    /// How often to look for due work without a notification (retries come due this way).
    public var pollInterval: Duration = .seconds(1)
    /// The most one attempt may take, from reading the delivery to recording the result. Past
    /// it the attempt is abandoned: its lease is no longer extended, so it expires and the next
    /// claim rescues the row (issue 8, item 11). Keep it above the database deadline three
    /// times over plus the transport's timeout.
    public var attemptDeadline: Duration = .seconds(90)
    /// Sends in flight at once to one endpoint in this pool, so a slow or dead receiver only
    /// slows itself (issue 8, item 13). A claim takes no more of an endpoint's rows than it has
    /// room for: the others stay due in the database until a slot is free (migration 0059).
    public var endpointConcurrency = 8
    /// How long a delivery given back while another worker runs its endpoint's circuit trial waits.
    public var endpointBusyDelay: TimeInterval = 2
    /// The circuit breaker: this many attempts in a row without an answer pause the endpoint
    /// for `circuitCooldown`; then one delivery is sent as a trial.
    public var circuitFailures = 5
    public var circuitCooldown: TimeInterval = 60
    public var retry = RetryPolicy()
    /// Confines the pool to one organisation (tests); nil serves every organisation.
    public var organisation: UUID?
    /// The lease owner's name: unique per pool (host, process, random suffix).
    public var name: String

    public init(name: String = WorkerPoolConfiguration.defaultName()) {
        self.name = name
    }

    public static func defaultName() -> String {
        let host = ProcessInfo.processInfo.hostName
        return "\(host):\(ProcessInfo.processInfo.processIdentifier):\(UUID().uuidString.prefix(8).lowercased())"
    }
}

/// The outbox's workers: a service inside `herald serve` (or alone in `herald worker`).
///
/// A `WorkRunner` over the outbox (`OutboxQueue`) and the send (`DeliveryHandler`): it wakes on
/// the process's `NotificationBus` (notify announces every committed event) and polls as a
/// fallback; claims due deliveries in batches through `claim_deliveries` (the one cross-tenant
/// path, `FOR UPDATE SKIP LOCKED`); holds each lease with a heartbeat; sends; and completes each
/// attempt fenced on (lease owner, attempt), in the delivery's organisation. On graceful
/// shutdown it stops claiming and waits for what is in flight (each send is bounded by its
/// transport's timeout); a process killed outright leaves leases that expire and are rescued by
/// the next claim.
public final class DeliveryWorkerPool: Service, Sendable {
    let runner: WorkRunner<OutboxQueue, DeliveryHandler>

    /// `database` connects as the worker role (`herald_worker`); `bus` is the process's one bus.
    public init(configuration: WorkerPoolConfiguration, database: Database, bus: NotificationBus, sender: DeliverySender, logger: Logger) {
        var runner = WorkRunnerConfiguration(name: configuration.name)
        runner.concurrency = configuration.concurrency
        runner.batchSize = configuration.batchSize
        runner.leaseSeconds = configuration.leaseSeconds
        runner.pollInterval = configuration.pollInterval
        runner.attemptDeadline = configuration.attemptDeadline
        let circuit = CircuitRule(failures: configuration.circuitFailures, cooldown: configuration.circuitCooldown)
        let slots = EndpointSlots(limit: configuration.endpointConcurrency)
        self.runner = WorkRunner(
            configuration: runner,
            queue: OutboxQueue(database: database, organisation: configuration.organisation, circuit: circuit, slots: slots),
            handler: DeliveryHandler(
                database: database, sender: sender, slots: slots,
                endpointBusyDelay: configuration.endpointBusyDelay, circuitCooldown: configuration.circuitCooldown,
                retry: configuration.retry),
            bus: bus, logger: logger)
    }

    public func run() async throws {
        try await runner.run()
    }
}

extension AttemptResult {
    /// The attempt's outcome as `delivery_attempts` logs it.
    var outcome: AttemptOutcome {
        switch self {
        case .sent: .sent
        case .failed: .failed
        case .dead: .dead
        case .cancelled: .cancelled
        }
    }

    var responseCode: Int? {
        switch self {
        case .sent(let code, _), .failed(let code, _, _), .dead(let code, _): code
        case .cancelled: nil
        }
    }

    var error: String? {
        switch self {
        case .sent: nil
        case .failed(_, let error, _), .dead(_, let error), .cancelled(let error): error
        }
    }
}
