import Foundation
import HeraldStore
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

// Background work is split as swift-jobs splits it (issue 9, part 3): a `WorkQueue` stores and
// claims (the driver), a `WorkHandler` does one item, and one `WorkRunner` runs the loop between
// them: claim with a lease, heartbeat, fenced completion, rescue, wake on the bus, poll, drain.
//
// Kinds of work, each a (queue, handler) pair on this same runner:
// - deliveries: `OutboxQueue` + `DeliveryHandler` (`DeliveryWorkerPool` wires them);
// - digest runs: `DigestQueue` + `DigestHandler` (DigestWork.swift): `claim_digest_runs`
//   makes a run per (user, frequency, slot) once its slot has come and leases due runs; the
//   handler attaches the items, renders and sends one digest;
// - scheduled jobs (next issue): a queue over a jobs table (claim, lease, fence as the outbox
//   does), and a handler that runs one job by name.
// A new kind writes those two conformances and one `WorkRunner(...)` in the process's service
// list; it never copies the loop.

/// One item a runner holds the lease of.
public protocol WorkClaim: Sendable, Hashable {
    /// The item's organisation: heartbeats and completions run in its tenant transaction.
    var organisationID: UUID { get }
    /// What identifies the item in logs (ids and attempt).
    var logMetadata: Logger.Metadata { get }
}

/// Where one kind of work is stored and how it is claimed (swift-jobs' `JobQueueDriver`).
/// Every change to a claimed item is fenced on (worker, attempt): a worker whose lease expired
/// cannot overwrite the item's next attempt.
public protocol WorkQueue: Sendable {
    associatedtype Claim: WorkClaim
    associatedtype Outcome: Sendable

    /// The kind's name in logs and metric labels (`herald_<kind>_abandoned_total`).
    var kind: String { get }
    /// Whether a bus message may mean new due work (`missedMessages` always wakes the runner).
    func wakes(on message: BusMessage) -> Bool
    /// Claims up to `limit` due items, leased to `worker` for `leaseSeconds` (`FOR UPDATE SKIP
    /// LOCKED` through a narrow SECURITY DEFINER function: the one cross-tenant path).
    func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [Claim]
    /// Extends the leases `worker` still holds on `claims`, all of `organisation`.
    func heartbeat(worker: String, organisation: UUID, claims: [Claim], leaseSeconds: Int) async throws
    /// Records how an item ended; false when the fence refused (the lease had expired).
    func complete(_ claim: Claim, worker: String, startedAt: Date, outcome: Outcome, logger: Logger) async throws -> Bool
    /// Gives an item back unattempted, due again at `until`; fenced like completion.
    func release(_ claim: Claim, worker: String, until: Date, reason: String) async throws -> Bool
    /// The handler threw or its result could not be recorded: what becomes of the item.
    func fail(_ claim: Claim, worker: String, error: any Error) async throws
    /// Puts items whose lease expired back in the queue; returns how many.
    func rescueExpired(worker: String) async throws -> Int
    /// Whether, after a claim that found less than it had room for, the runner waits for half
    /// the items then running to end before it claims again (the bus, an idle runner or a poll
    /// interval claims at once). Right for items that wait for slots the running ones free
    /// (deliveries behind an endpoint's send slots); wrong where an item ending makes the next
    /// due (a fan-out's chunks). False unless the queue says so.
    var pacesShortClaims: Bool { get }
}

extension WorkQueue {
    public var pacesShortClaims: Bool { false }
}

/// What a handler made of one item.
public enum WorkDisposition<Outcome: Sendable>: Sendable {
    /// Done (well or not): the queue records `outcome`, fenced.
    case done(Outcome)
    /// Not attempted, for a reason of this process (an open circuit, no connection free): the
    /// item goes back, due at `until`, without counting an attempt.
    case giveBack(until: Date, reason: String)
}

/// Does one item of work (swift-jobs' job handler). It neither claims nor completes: the runner does.
public protocol WorkHandler: Sendable {
    associatedtype Claim: WorkClaim
    associatedtype Outcome: Sendable

    /// Does `claim`'s work. Cancelled when the attempt's deadline passes.
    func handle(_ claim: Claim, logger: Logger) async throws -> WorkDisposition<Outcome>
    /// Called once per item when the runner is done with it: `disposition` nil when `handle`
    /// threw; `recorded` nil when recording failed, false when the fence refused.
    func finished(_ claim: Claim, disposition: WorkDisposition<Outcome>?, recorded: Bool?, duration: Duration, logger: Logger)
}

/// How a runner claims and paces its work.
public struct WorkRunnerConfiguration: Sendable {
    /// The lease owner's name: unique per runner (host, process, random suffix).
    public var name: String
    /// Items handled (sent) at once. An item whose handling ended no longer takes one while its
    /// outcome is recorded; at most as many again may wait for their recording.
    public var concurrency = 16
    /// Most items claimed in one round trip.
    public var batchSize = 32
    /// How long a claim holds an item when nothing else is said.
    public static let defaultLeaseSeconds = 60
    /// How long a claim holds an item; the heartbeat extends it every third of that.
    public var leaseSeconds = Self.defaultLeaseSeconds
    /// How often to look for due work without a wake-up (retries come due this way).
    public var pollInterval: Duration = .seconds(1)
    /// The most one item may take, handling and recording. Past it the item is abandoned: its
    /// lease is no longer extended, so it expires and is rescued (issue 8, item 11).
    public var attemptDeadline: Duration = .seconds(90)

    public init(name: String) {
        self.name = name
    }
}

/// The loop between a queue and its handler, as a service: claims while there is room, runs
/// each item in its own task under a deadline, heartbeats the leases in flight, wakes on the
/// bus and polls as a fallback. On graceful shutdown it stops claiming and waits for what is
/// in flight; a process killed outright leaves leases that expire and are rescued.
public final class WorkRunner<Queue: WorkQueue, Handler: WorkHandler>: Service, Sendable
where Handler.Claim == Queue.Claim, Handler.Outcome == Queue.Outcome {
    public let configuration: WorkRunnerConfiguration
    let queue: Queue
    let handler: Handler
    let bus: NotificationBus
    let logger: Logger
    /// Each item in flight with its deadline; the heartbeat skips those past it.
    private let inFlight = Mutex<[Queue.Claim: ContinuousClock.Instant]>([:])
    /// Items in flight whose handler has not returned yet: what `concurrency` bounds.
    private let handling = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    /// The bus said there may be new due work since the loop last looked.
    private let announced = Atomic<Bool>(false)

    public init(configuration: WorkRunnerConfiguration, queue: Queue, handler: Handler, bus: NotificationBus, logger: Logger) {
        self.configuration = configuration
        self.queue = queue
        self.handler = handler
        self.bus = bus
        var logger = logger
        logger[metadataKey: "worker"] = .string(configuration.name)
        self.logger = logger
    }

    public func run() async throws {
        let (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        // Subscribed before the first claim, so nothing committed after it goes unheard.
        let messages = bus.subscribe()
        logger.info("\(queue.kind) workers started", metadata: ["concurrency": "\(configuration.concurrency)"])
        await withTaskGroup(of: Void.self) { background in
            background.addTask { await self.follow(messages, wake) }
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
        logger.info("\(queue.kind) workers stopped")
    }

    /// The fewest free slots worth a claim while items are in flight: half the slots (or half a
    /// batch, if smaller). A claim, the batch's read and its completions cost about the same for
    /// 4 rows as for 16, so bigger claims cost less CPU per item, in the worker and in PostgreSQL
    /// (issue 12; docs/benchmarks.md, "CPU per message"). Slots held by slow sends cannot keep
    /// the others idle for long: once free slots have waited a poll interval, any number of them
    /// is claimed at the loop's next wake-up (at most about two poll intervals in all).
    private var claimThreshold: Int { max(1, min(configuration.batchSize, configuration.concurrency) / 2) }

    /// Claims while there is room, runs each claim in its own task, and sleeps until the bus,
    /// a finished item or the poll interval wakes it.
    private func claimLoop(_ wakeups: AsyncStream<Void>, _ wake: AsyncStream<Void>.Continuation) async {
        await withDiscardingTaskGroup { items in
            var iterator = wakeups.makeAsyncIterator()
            // Since when the free slots have waited for a claim (nil: none free, or just claimed).
            var waitingSince: ContinuousClock.Instant?
            // After a claim that found less than it had room for: the items running then. What
            // held it back (nothing more due, or a full endpoint's send slots) frees up as items
            // end, so an ended item claims again only once half of those have ended; the bus, an
            // idle runner or a poll interval claims at once. (One claim per ended item, each two
            // statements, cost more PostgreSQL CPU than the sends behind one busy endpoint.)
            var runningAfterShortClaim: Int?
            while !stopping.load(ordering: .relaxed) && !Task.isCancelled {
                // Recording an outcome is a database round trip in a batch, not a send: the next
                // sends start while it runs (the slots moved in lockstep, claim, send, record,
                // when they waited for it). Items still being recorded count against a second
                // `concurrency`, so a slow database holds the claims back.
                let running = handling.load(ordering: .relaxed)
                let held = inFlight.withLock { $0.count }
                let room = min(configuration.batchSize, configuration.concurrency - running, 2 * configuration.concurrency - held)
                var claims: [Queue.Claim] = []
                let now = ContinuousClock.now
                if room > 0 { waitingSince = waitingSince ?? now } else { waitingSince = nil }
                // While items run, wait until half the slots are free (every item that ends wakes
                // the loop), or until the free slots have waited a poll interval.
                let waitedLong = waitingSince.map { now - $0 >= configuration.pollInterval } ?? false
                var claiming = room > 0 && (running == 0 || room >= claimThreshold || waitedLong)
                if claiming, queue.pacesShortClaims, running > 0, !waitedLong, let before = runningAfterShortClaim, running > before / 2 {
                    claiming = announced.load(ordering: .relaxed)
                }
                if claiming {
                    waitingSince = nil
                    // Whatever the bus announces from here on, this claim may not see.
                    announced.store(false, ordering: .relaxed)
                    do {
                        claims = try await queue.claim(worker: configuration.name, limit: room, leaseSeconds: configuration.leaseSeconds)
                    } catch is CancellationError {
                        break // the runner is being cancelled: nothing failed
                    } catch {
                        logger.error("claiming \(queue.kind) work failed", metadata: ["error": "\(String(reflecting: error))"])
                    }
                }
                for claim in claims {
                    inFlight.withLock { $0[claim] = .now + configuration.attemptDeadline }
                    handling.add(1, ordering: .relaxed)
                    items.addTask {
                        let slot = HandlingSlot {
                            self.handling.subtract(1, ordering: .relaxed)
                            wake.yield()
                        }
                        await self.runWithinDeadline(claim, slot: slot)
                        slot.leave()
                        self.inFlight.withLock { _ = $0.removeValue(forKey: claim) }
                        wake.yield()
                    }
                }
                // A full batch means more may be due: claim again at once.
                if claiming && claims.count == room {
                    runningAfterShortClaim = nil
                    continue
                }
                if claiming { runningAfterShortClaim = handling.load(ordering: .relaxed) }
                _ = await iterator.next()
            }
            let remaining = inFlight.withLock { $0.count }
            if remaining > 0 { logger.info("draining \(queue.kind) work in flight", metadata: ["count": "\(remaining)"]) }
        }
    }

    /// Wakes the claim loop on the bus messages that may mean due work, and on every
    /// `missedMessages` (work may have been committed while nobody listened).
    private func follow(_ messages: AsyncStream<BusMessage>, _ wake: AsyncStream<Void>.Continuation) async {
        for await message in messages where message == .missedMessages || queue.wakes(on: message) {
            announced.store(true, ordering: .relaxed)
            wake.yield()
        }
    }

    private func tick(_ wake: AsyncStream<Void>.Continuation) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: configuration.pollInterval)
            wake.yield()
        }
    }

    /// Every third of a lease: extends the leases of every item in flight, per organisation (not
    /// those past their deadline, whose leases must expire so they are rescued), then rescues
    /// expired leases of other workers.
    private func heartbeat() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(max(1, configuration.leaseSeconds / 3)))
            if Task.isCancelled { return }
            let now = ContinuousClock.now
            let live = inFlight.withLock { $0.filter { $0.value > now }.map(\.key) }
            for (organisation, claims) in Dictionary(grouping: live, by: \.organisationID) {
                do {
                    try await queue.heartbeat(
                        worker: configuration.name, organisation: organisation, claims: claims,
                        leaseSeconds: configuration.leaseSeconds)
                } catch {
                    logger.warning("extending leases failed", metadata: ["error": "\(String(reflecting: error))"])
                }
            }
            do {
                let rescued = try await queue.rescueExpired(worker: configuration.name)
                if rescued > 0 { logger.info("expired leases rescued", metadata: ["count": "\(rescued)"]) }
            } catch {
                logger.warning("rescuing expired leases failed", metadata: ["error": "\(String(reflecting: error))"])
            }
        }
    }

    /// `run` raced against the item's deadline. Past it the item is abandoned: the heartbeat
    /// already skips it, and cancelling it ends a send or a wait for a connection.
    private func runWithinDeadline(_ claim: Queue.Claim, slot: HandlingSlot? = nil) async {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await self.perform(claim, slot: slot); return true
            }
            group.addTask { (try? await EventLoopTimer.sleep(for: self.configuration.attemptDeadline)) != nil ? false : true }
            if await group.next() == false {
                Counter(label: "herald_\(queue.kind)_abandoned_total").increment()
                logger.error(
                    "\(queue.kind) attempt abandoned at its deadline; its lease will expire and the item be rescued",
                    metadata: claim.logMetadata.merging(["deadline": "\(configuration.attemptDeadline)"]) { $1 })
            }
            group.cancelAll()
        }
    }

    /// Claims and runs whatever is due now, batch by batch, until nothing is; returns how many
    /// items it ran. For operators who run the work from their own cron (`herald digests send`)
    /// instead of a long-running process; `progress` hears each batch as it finishes.
    public func runDue(progress: (_ batch: Int, _ total: Int) -> Void = { _, _ in }) async throws -> Int {
        var total = 0
        while true {
            let claims = try await queue.claim(
                worker: configuration.name, limit: configuration.batchSize, leaseSeconds: configuration.leaseSeconds)
            if claims.isEmpty { return total }
            await withTaskGroup(of: Void.self) { group in
                for claim in claims { group.addTask { await self.runWithinDeadline(claim) } }
            }
            total += claims.count
            progress(claims.count, total)
        }
    }

    /// One item: handle it, then record what came of it through the queue (fenced). `slot` is
    /// left as soon as the handler returns, before the recording.
    func perform(_ claim: Queue.Claim, slot: HandlingSlot? = nil) async {
        let clock = ContinuousClock()
        let start = clock.now
        let started = Date()
        var logger = logger
        for (key, value) in claim.logMetadata { logger[metadataKey: key] = value }
        var disposition: WorkDisposition<Queue.Outcome>?
        var recorded: Bool?
        do {
            let done: WorkDisposition<Queue.Outcome>
            do {
                done = try await handler.handle(claim, logger: logger)
                slot?.leave()
            } catch {
                slot?.leave()
                throw error
            }
            disposition = done
            switch done {
            case .done(let outcome):
                recorded = try await queue.complete(claim, worker: configuration.name, startedAt: started, outcome: outcome, logger: logger)
            case .giveBack(let until, let reason):
                recorded = try await queue.release(claim, worker: configuration.name, until: until, reason: reason)
                logger.debug("\(queue.kind) given back", metadata: ["reason": .string(reason), "due": .string(until.formatted(.iso8601))])
            }
        } catch {
            // The lease expires and the next claim rescues the item; nothing is lost.
            logger.error("\(queue.kind) attempt could not be recorded", metadata: ["error": "\(String(reflecting: error))"])
            do {
                try await queue.fail(claim, worker: configuration.name, error: error)
            } catch {
                logger.warning("\(queue.kind) failure could not be recorded", metadata: ["error": "\(String(reflecting: error))"])
            }
        }
        handler.finished(claim, disposition: disposition, recorded: recorded, duration: clock.now - start, logger: logger)
    }
}

/// A runner's handling slot, left once: when the handler returns or throws (cancelled at the
/// deadline, it returns or throws too), and again, to no effect, when the item ends.
final class HandlingSlot: Sendable {
    private let left = Atomic<Bool>(false)
    private let onLeave: @Sendable () -> Void

    init(_ onLeave: @escaping @Sendable () -> Void) {
        self.onLeave = onLeave
    }

    func leave() {
        if !left.exchange(true, ordering: .relaxed) { onLeave() }
    }
}
