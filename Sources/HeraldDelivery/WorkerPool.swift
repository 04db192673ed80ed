import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// How a pool of delivery workers behaves.
public struct WorkerPoolConfiguration: Sendable {
    /// Deliveries in flight at once.
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
    /// Sends in flight at once to one endpoint in this process, so a slow or dead receiver only
    /// slows itself (issue 8, item 13). A delivery that finds its endpoint full is given back
    /// without counting an attempt, due again after `endpointBusyDelay`.
    public var endpointConcurrency = 8
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
/// It wakes on `LISTEN herald_events` (notify announces every committed event) and polls as a
/// fallback; claims due deliveries in batches through `claim_deliveries` (the one cross-tenant
/// path, `FOR UPDATE SKIP LOCKED`); holds each lease with a heartbeat; sends; and completes each
/// attempt fenced on (lease owner, attempt), in the delivery's organisation. On graceful
/// shutdown it stops claiming and waits for what is in flight (each send is bounded by its
/// transport's timeout); a process killed outright leaves leases that expire and are rescued by
/// the next claim.
public final class DeliveryWorkerPool: Service, Sendable {
    let configuration: WorkerPoolConfiguration
    let database: Database
    let listenClient: PostgresClient
    let sender: DeliverySender
    let logger: Logger
    /// Each delivery in flight with its attempt's deadline; the heartbeat skips those past it.
    private let inFlight = Mutex<[ClaimedDelivery: ContinuousClock.Instant]>([:])
    /// Sends in flight per endpoint.
    private let endpointSends = Mutex<[UUID: Int]>([:])
    private let stopping = Atomic<Bool>(false)

    /// `database` and `listenClient` connect as the worker role (`herald_worker`).
    public init(configuration: WorkerPoolConfiguration, database: Database, listenClient: PostgresClient, sender: DeliverySender, logger: Logger) {
        self.configuration = configuration
        self.database = database
        self.listenClient = listenClient
        self.sender = sender
        var logger = logger
        logger[metadataKey: "worker"] = .string(configuration.name)
        self.logger = logger
    }

    public func run() async throws {
        let (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        logger.info("delivery workers started", metadata: ["concurrency": "\(configuration.concurrency)"])
        await withTaskGroup(of: Void.self) { background in
            background.addTask { await self.listen(wake) }
            background.addTask { await self.tick(wake) }
            background.addTask { await self.heartbeat() }
            await withGracefulShutdownHandler {
                await self.claimLoop(wakeups, wake)
            } onGracefulShutdown: {
                self.stopping.store(true, ordering: .relaxed)
                wake.yield()
            }
            background.cancelAll()
        }
        logger.info("delivery workers stopped")
    }

    /// Claims while there is room, sends each claim in its own task, and sleeps until a
    /// notification, a finished send or the poll interval wakes it.
    private func claimLoop(_ wakeups: AsyncStream<Void>, _ wake: AsyncStream<Void>.Continuation) async {
        await withDiscardingTaskGroup { sends in
            var iterator = wakeups.makeAsyncIterator()
            while !stopping.load(ordering: .relaxed) && !Task.isCancelled {
                let room = min(configuration.batchSize, configuration.concurrency - inFlight.withLock { $0.count })
                var claims: [ClaimedDelivery] = []
                if room > 0 {
                    do {
                        claims = try await database.claimDeliveries(worker: configuration.name, limit: room, leaseSeconds: configuration.leaseSeconds,
                                                                    organisation: configuration.organisation)
                    } catch {
                        logger.error("claiming deliveries failed", metadata: ["error": "\(String(reflecting: error))"])
                    }
                }
                for claim in claims {
                    inFlight.withLock { $0[claim] = .now + configuration.attemptDeadline }
                    sends.addTask {
                        await self.processWithinDeadline(claim)
                        self.inFlight.withLock { _ = $0.removeValue(forKey: claim) }
                        wake.yield()
                    }
                }
                // A full batch means more may be due: claim again at once.
                if room > 0 && claims.count == room { continue }
                _ = await iterator.next()
            }
            let remaining = inFlight.withLock { $0.count }
            if remaining > 0 { logger.info("draining deliveries in flight", metadata: ["count": "\(remaining)"]) }
        }
    }

    /// `LISTEN herald_events`, reconnecting after a failure.
    private func listen(_ wake: AsyncStream<Void>.Continuation) async {
        while !Task.isCancelled {
            do {
                try await listenClient.withConnection { connection in
                    try await connection.listen(on: "herald_events") { notifications in
                        wake.yield() // anything committed while not listening
                        for try await _ in notifications { wake.yield() }
                    }
                }
            } catch {
                if Task.isCancelled { return }
                logger.warning("listening for events failed; polling until it is back", metadata: ["error": "\(String(reflecting: error))"])
            }
            try? await Task.sleep(for: .seconds(1))
        }
    }

    private func tick(_ wake: AsyncStream<Void>.Continuation) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: configuration.pollInterval)
            wake.yield()
        }
    }

    /// Extends the leases of every delivery in flight, per organisation, every third of a lease;
    /// not those past their attempt's deadline, whose leases must expire so they are rescued.
    private func heartbeat() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(max(1, configuration.leaseSeconds / 3)))
            let now = ContinuousClock.now
            let live = inFlight.withLock { $0.filter { $0.value > now }.map(\.key) }
            let byOrganisation = Dictionary(grouping: live, by: \.organisationID)
            for (organisation, claims) in byOrganisation {
                do {
                    try await database.withTenant(organisation) { tx in
                        try await tx.extendLeases(worker: configuration.name, claims: claims, leaseSeconds: configuration.leaseSeconds)
                    }
                } catch {
                    logger.warning("extending leases failed", metadata: ["error": "\(String(reflecting: error))"])
                }
            }
        }
    }

    /// `process` raced against the attempt's deadline. Past it the attempt is abandoned: the
    /// heartbeat already skips it, and cancelling it ends a send or a wait for a connection.
    private func processWithinDeadline(_ claim: ClaimedDelivery) async {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask { await self.process(claim); return true }
            group.addTask { (try? await Task.sleep(for: self.configuration.attemptDeadline)) != nil ? false : true }
            if await group.next() == false {
                Counter(label: "herald_delivery_abandoned_total").increment()
                logger.error("delivery attempt abandoned at its deadline; its lease will expire and the row be rescued", metadata: [
                    "organisation_id": .string(claim.organisationID.lowercased), "delivery_id": .string(claim.deliveryID.lowercased),
                    "attempt": "\(claim.attempt)", "deadline": "\(configuration.attemptDeadline)",
                ])
            }
            group.cancelAll()
        }
    }

    /// Takes a send slot of `endpoint`, or says until when to give the delivery back: while its
    /// circuit is open, while another worker runs the half-open trial, or while its slots are full.
    private func admit(_ endpoint: Endpoint, _ claim: ClaimedDelivery, now: Date) async throws -> (until: Date, why: String)? {
        let busy = now.addingTimeInterval(configuration.endpointBusyDelay + Double.random(in: 0..<1))
        let state = endpoint.circuit.state(at: now)
        if state == .open, let retryAt = endpoint.circuit.retryAt {
            return (retryAt, "circuit open")
        }
        let limit = configuration.endpointConcurrency
        let entered = endpointSends.withLock { sends in
            guard sends[endpoint.id, default: 0] < limit else { return false }
            sends[endpoint.id, default: 0] += 1
            return true
        }
        guard entered else { return (busy, "endpoint busy") }
        if state == .halfOpen {
            let trial = try await database.withTenant(claim.organisationID) { tx in
                try await tx.takeCircuitTrial(endpoint.id, cooldown: configuration.circuitCooldown)
            }
            if !trial {
                leave(endpoint.id)
                return (busy, "circuit trial running")
            }
        }
        return nil
    }

    private func leave(_ endpoint: UUID) {
        endpointSends.withLock { sends in
            sends[endpoint, default: 1] -= 1
            if sends[endpoint] == 0 { sends[endpoint] = nil }
        }
    }

    /// Gives the delivery back, not counted as an attempt.
    private func release(_ claim: ClaimedDelivery, until: Date, why: String, logger: Logger) async throws {
        try await database.withTenant(claim.organisationID) { tx in
            try await tx.releaseDelivery(claim, worker: configuration.name, until: until)
        }
        Counter(label: "herald_delivery_released_total", dimensions: [("reason", why)]).increment()
        logger.debug("delivery given back", metadata: ["reason": .string(why), "due": .string(until.formatted(.iso8601))])
    }

    /// One attempt: read (in the delivery's organisation), send, complete (fenced).
    func process(_ claim: ClaimedDelivery) async {
        let started = Date()
        var logger = logger
        logger[metadataKey: "organisation_id"] = .string(claim.organisationID.lowercased)
        logger[metadataKey: "delivery_id"] = .string(claim.deliveryID.lowercased)
        logger[metadataKey: "attempt"] = "\(claim.attempt)"
        do {
            let work = try await database.withTenant(claim.organisationID) { tx in try await tx.deliveryWork(claim.deliveryID) }
            var slot: UUID?
            defer { if let slot { leave(slot) } }
            if let endpoint = work.endpoint, endpoint.enabled {
                if let (until, why) = try await admit(endpoint, claim, now: Date()) {
                    return try await release(claim, until: until, why: why, logger: logger)
                }
                slot = endpoint.id
            }
            let outcome = await sender.send(work, attempt: claim.attempt, logger: logger)
            if case .deferred(let why) = outcome {
                return try await release(claim, until: Date().addingTimeInterval(configuration.endpointBusyDelay), why: why, logger: logger)
            }
            let result = outcome.result(attempt: claim.attempt, maxAttempts: work.delivery.maxAttempts, policy: configuration.retry, now: Date())
            let completed = try await database.withTenant(claim.organisationID) { tx in
                let completed = try await tx.completeDelivery(claim, worker: configuration.name, startedAt: started, result: result)
                if completed, case .gone = outcome, let endpoint = work.endpoint {
                    try await tx.disableEndpoint(endpoint.id, reason: "The receiver answered 410 Gone on \(Date().formatted(.iso8601)).")
                }
                if completed, let endpoint = work.endpoint, slot != nil, let answered = outcome.receiverAnswered {
                    if answered {
                        try await tx.recordEndpointAnswer(endpoint.id)
                    } else if try await tx.recordEndpointNoAnswer(
                        endpoint.id, threshold: configuration.circuitFailures, cooldown: configuration.circuitCooldown,
                        reason: "\(configuration.circuitFailures) attempts in a row got no answer; the last: \(result.error ?? "no answer")") {
                        logger.warning("endpoint circuit opened", metadata: ["endpoint_id": .string(endpoint.id.lowercased)])
                    }
                }
                return completed
            }
            let duration = Date().timeIntervalSince(started)
            Counter(label: "herald_delivery_attempts_total",
                    dimensions: [("channel", work.delivery.channel), ("outcome", completed ? result.status : "FENCED")]).increment()
            Timer(label: "herald_delivery_attempt_seconds", dimensions: [("channel", work.delivery.channel)]).recordSeconds(duration)
            logger.info("delivery attempt", metadata: [
                "channel": .string(work.delivery.channel), "outcome": .string(completed ? result.status : "FENCED"),
                "duration_ms": "\(Int(duration * 1000))", "response_code": "\(result.responseCode.map(String.init) ?? "-")",
                "error": .string(result.error ?? ""),
            ])
        } catch {
            // The lease expires and the next claim rescues the row; nothing is lost.
            logger.error("delivery attempt could not be recorded", metadata: ["error": "\(String(reflecting: error))"])
        }
    }
}

extension AttemptResult {
    var status: String {
        switch self {
        case .sent: "SENT"
        case .failed: "FAILED"
        case .dead: "DEAD"
        }
    }

    var responseCode: Int? {
        switch self {
        case .sent(let code, _), .failed(let code, _, _), .dead(let code, _): code
        }
    }

    var error: String? {
        switch self {
        case .sent: nil
        case .failed(_, let error, _), .dead(_, let error): error
        }
    }
}
