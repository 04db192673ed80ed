import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics
import Synchronization

// Chunked fan-out, a fifth kind of work on the runner (issue 12, migration 0021): notify accepts
// an event whose audience is above the synchronous limit without writing its recipients;
// `FanoutQueue` leases it (`claim_fanouts`) and `FanoutHandler` writes its recipients a chunk
// per transaction. It runs as the application role (a chunk is notify's write), in `herald serve`.

extension ClaimedFanout: WorkClaim {
    public var logMetadata: Logger.Metadata {
        ["organisation_id": .string(organisationID.lowercased), "event_id": .string(eventID.lowercased), "attempt": "\(attempt)"]
    }
}

/// How a lease of a fan-out ended.
public enum FanoutOutcome: Sendable, Equatable {
    /// Every recipient is written.
    case finished(done: Int)
    /// The event was cancelled: the chunks not yet written never will be.
    case cancelled(done: Int)
    /// The lease's time budget ran out with chunks left: the lease is freed and the event is
    /// claimed again (by this instance or another), going on from its cursor.
    case paused(done: Int)
    /// The lease moved on: another instance has the event.
    case leaseLost
}

/// Events still expanding, as a `WorkQueue`.
public struct FanoutQueue: WorkQueue {
    let database: Database
    let organisation: UUID?

    /// `organisation` confines the claims (tests).
    public init(database: Database, organisation: UUID? = nil) {
        self.database = database
        self.organisation = organisation
    }

    public var kind: String { "fanout" }

    /// notify announces an event it accepts for a chunked fan-out as such; the other events, and
    /// the chunks' own commits, leave the fan-out runners asleep.
    public func wakes(on message: BusMessage) -> Bool {
        guard case .eventCommitted(let organisationID, _, let work) = message, work.contains(.fanout) else { return false }
        return organisation.map { $0 == organisationID } ?? true
    }

    public func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [ClaimedFanout] {
        try await database.claimFanouts(worker: worker, limit: limit, leaseSeconds: leaseSeconds, organisation: organisation)
    }

    public func heartbeat(worker: String, organisation: UUID, claims: [ClaimedFanout], leaseSeconds: Int) async throws {
        _ = try await database.withTenant(organisation) { tx in
            try await tx.extendFanoutLeases(worker: worker, claims: claims, leaseSeconds: leaseSeconds)
        }
    }

    /// Each chunk recorded itself; a paused fan-out frees its lease for the next claim.
    public func complete(
        _ claim: ClaimedFanout, worker: String, startedAt: Date, outcome: FanoutOutcome, logger: Logger
    ) async throws -> Bool {
        switch outcome {
        case .finished, .cancelled: return true
        case .leaseLost: return false
        case .paused:
            _ = try await release(claim, worker: worker, until: Date(), reason: "time budget")
            return true
        }
    }

    public func release(_ claim: ClaimedFanout, worker: String, until: Date, reason: String) async throws -> Bool {
        try await database.withTenant(claim.organisationID) { tx in try await tx.releaseFanout(claim, worker: worker) }
        return true
    }

    /// A chunk failed (it rolled back whole): counted, and the lease is freed; the next claim
    /// tries the same chunk again. The tenth failure in a row ends the fan-out FAILED (0024).
    public func fail(_ claim: ClaimedFanout, worker: String, error: any Error) async throws {
        let state = try await database.withTenant(claim.organisationID) { tx in
            try await tx.failFanout(claim, worker: worker, error: String(describing: error))
        }
        if state == .failed {
            Counter(label: "herald_fanouts_total", dimensions: [("outcome", "failed")]).increment()
        }
    }

    /// Nothing apart: `claim_fanouts` takes events whose lease expired.
    public func rescueExpired(worker: String) async throws -> Int { 0 }
}

/// Writes a leased event's recipients, a chunk per transaction, until they are all written, the
/// event is cancelled, or the lease's time budget runs out.
public struct FanoutHandler: WorkHandler {
    let database: Database
    /// The runner's name: the lease owner the event is fenced on.
    let worker: String
    let chunkSize: Int
    /// How long the lease runs from each chunk's commit: the runner's `leaseSeconds`.
    let leaseSeconds: Int
    /// How long one lease writes chunks before giving the event back (under the runner's attempt deadline).
    let budget: Duration
    let now: @Sendable () -> Date

    public init(
        database: Database, worker: String, chunkSize: Int, leaseSeconds: Int = WorkRunnerConfiguration.defaultLeaseSeconds,
        budget: Duration = .seconds(30),
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.database = database
        self.worker = worker
        self.chunkSize = chunkSize
        self.leaseSeconds = leaseSeconds
        self.budget = budget
        self.now = now
    }

    public func handle(_ claim: ClaimedFanout, logger: Logger) async throws -> WorkDisposition<FanoutOutcome> {
        let first = try await prepare(claim, from: .storedCursor)
        // The audience is counted for the event's progress (`fanout.expected`) in a task of its
        // own, beside the chunks, and the count goes with the first chunk written after it ends.
        // Counted inside the second chunk's planning, it held that chunk's write back once the
        // first had committed (one core idle for up to half a second in a sampled 100 000-member
        // fan-out; the count of a million takes about a second). An audience the first chunk
        // covers is not counted: its end says the total. The lease ends once the count has.
        let counted = Mutex<Int?>(nil)
        let counting: Task<Void, Never>? =
            first.map({ !$0.finished }) == true
            ? Task { [database, worker] in
                let count = try? await database.withTenant(claim.organisationID) { tx in
                    try await tx.countFanoutAudience(claim, worker: worker)
                }
                if let count { counted.withLock { $0 = count } }
            } : nil
        return try await withTaskCancellationHandler {
            do {
                let outcome = try await expand(claim, first: first, counted: counted, counting: counting, logger: logger)
                await counting?.value
                return outcome
            } catch {
                await counting?.value
                throw error
            }
        } onCancel: {
            counting?.cancel()
        }
    }

    private func expand(
        _ claim: ClaimedFanout, first: PreparedChunk?, counted: borrowing Mutex<Int?>, counting: Task<Void, Never>?, logger: Logger
    ) async throws -> WorkDisposition<FanoutOutcome> {
        let clock = ContinuousClock()
        let start = clock.now
        // Two chunks are written at once, each in a transaction of its own, while the one after
        // them is planned: a chunk's write is one backend's work, and planning (the server's
        // work, and PostgreSQL's reads) overlaps the writes. The second write locks the event's
        // row only after its recipients are written (`writeChunkBehind`), so it waits for the
        // first to commit only at its end. A chunk that cannot be planned ahead or written behind
        // (the event was cancelled, or the lease moved) goes through expandChunk, which settles it.
        var next = first
        // The write of the chunk before `next`, not yet settled.
        var writing: (task: Task<FanoutStep?, any Error>, started: Date)?
        // Users written so far, as the last chunk settled said (nil: none settled by this lease).
        var done: Int?
        do {
            while true {
                // A lease writes its first chunk whatever its budget, and starts no write after it.
                if var chunk = next, (writing == nil && done == nil) || clock.now - start <= budget {
                    if chunk.expected == nil { chunk.expected = counted.withLock { $0 } }
                    let behind = writing != nil
                    let previous = writing
                    writing = (Task { [chunk] in try await write(claim, chunk, behind: behind) }, Date())
                    async let following = prepare(claim, after: chunk)
                    if let previous {
                        switch try settle(await previous.task.value, started: previous.started, logger: logger) {
                        case .end(let outcome):
                            _ = try? await writing?.task.value
                            return .done(outcome)
                        case .goOn(let written):
                            done = written
                        case .resettle:
                            // The write behind it fails its fence too: the event is settled below.
                            _ = try? await writing?.task.value
                            writing = nil
                            _ = try? await following
                            next = nil
                            continue
                        }
                    }
                    next = try await following
                    continue
                }
                // Nothing planned ahead, or the time budget ran out: the write in flight ends first.
                if let previous = writing {
                    writing = nil
                    switch try settle(await previous.task.value, started: previous.started, logger: logger) {
                    case .end(let outcome): return .done(outcome)
                    case .goOn(let written): done = written
                    case .resettle: next = nil
                    }
                }
                if let done, clock.now - start > budget {
                    // The lease gives the event back: the count goes with it.
                    await counting?.value
                    if let expected = counted.withLock({ $0 }) {
                        try await database.withTenant(claim.organisationID) { tx in
                            try await tx.recordFanoutExpected(claim, worker: worker, expected: expected)
                        }
                    }
                    return .done(.paused(done: done))
                }
                if next != nil { continue }
                let started = Date()
                let step = try await database.withTenant(claim.organisationID) { tx in
                    try await tx.expandChunk(claim, worker: worker, size: chunkSize, now: now(), leaseSeconds: leaseSeconds)
                }
                switch settle(step, started: started, logger: logger) {
                case .end(let outcome): return .done(outcome)
                case .goOn(let written): done = written
                case .resettle: break // expandChunk never rolls back on its own
                }
                next = try await prepare(claim, from: .storedCursor)
            }
        } catch {
            if let writing { _ = try? await writing.task.value }
            throw error
        }
    }

    /// What a written chunk means for the lease: go on, end, or (a chunk written behind another
    /// was rolled back) settle the event through `expandChunk`.
    private enum Settled {
        case goOn(done: Int)
        case end(FanoutOutcome)
        case resettle
    }

    private func settle(_ step: FanoutStep?, started: Date, logger: Logger) -> Settled {
        switch step {
        case nil:
            return .resettle
        case .leaseLost:
            return .end(.leaseLost)
        case .cancelled(let done):
            return .end(.cancelled(done: done))
        case .expanded(let done, let finished):
            Counter(label: "herald_fanout_chunks_total").increment()
            logger.debug(
                "fan-out chunk written", metadata: ["done": "\(done)", "chunk_ms": "\(Int(Date().timeIntervalSince(started) * 1000))"])
            return finished ? .end(.finished(done: done)) : .goOn(done: done)
        }
    }

    /// Writes a chunk planned ahead: fenced on the event's row from the start, or, `behind`
    /// another chunk's write, fenced at its end (nil when that fence failed and it rolled back).
    private func write(_ claim: ClaimedFanout, _ chunk: PreparedChunk, behind: Bool) async throws -> FanoutStep? {
        do {
            let step = try await database.withTenant(claim.organisationID) { tx in
                behind
                    ? try await tx.writeChunkBehind(claim, chunk, worker: worker, leaseSeconds: leaseSeconds)
                    : try await tx.writeChunk(claim, chunk, worker: worker, leaseSeconds: leaseSeconds)
            }
            if case .expanded = step { EngineMetrics.decided(chunk.counts) }
            return step
        } catch is ChunkNotWritten {
            return nil
        }
    }

    /// The chunk after `chunk`, planned while `chunk` is written; nil after the last.
    private func prepare(_ claim: ClaimedFanout, after chunk: PreparedChunk) async throws -> PreparedChunk? {
        guard !chunk.finished, let last = chunk.last else { return nil }
        return try await prepare(claim, from: .after(last))
    }

    private func prepare(_ claim: ClaimedFanout, from start: ChunkStart) async throws -> PreparedChunk? {
        try await database.withTenant(claim.organisationID) { tx in
            try await tx.prepareChunk(claim, worker: worker, from: start, size: chunkSize, now: now())
        }
    }

    public func finished(
        _ claim: ClaimedFanout, disposition: WorkDisposition<FanoutOutcome>?, recorded: Bool?, duration: Duration, logger: Logger
    ) {
        switch disposition {
        case .done(.finished(let done)):
            Counter(label: "herald_fanouts_total", dimensions: [("outcome", "finished")]).increment()
            logger.info("fan-out finished", metadata: ["recipients": "\(done)"])
        case .done(.cancelled(let done)):
            Counter(label: "herald_fanouts_total", dimensions: [("outcome", "cancelled")]).increment()
            logger.info("fan-out stopped: the event was cancelled", metadata: ["recipients": "\(done)"])
        case .done(.paused(let done)):
            logger.info("fan-out paused for the next claim", metadata: ["recipients": "\(done)"])
        case .done(.leaseLost):
            logger.info("fan-out left: the lease moved on")
        case .giveBack, nil:
            Counter(label: "herald_fanouts_total", dimensions: [("outcome", "failed_chunk")]).increment()
        }
    }
}
