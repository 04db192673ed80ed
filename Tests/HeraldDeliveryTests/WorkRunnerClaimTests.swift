import Foundation
import HeraldStore
import Logging
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldDelivery

/// When the runner claims while items are in flight (issue 12): half a batch at a time, but free
/// slots never wait much longer than a poll interval behind sends that hold the others.
@Suite("Work runner claims")
struct WorkRunnerClaimTests {
    struct Item: WorkClaim {
        var id: Int
        var organisationID: UUID { UUID(uuidString: "00000000-0000-0000-0000-000000000001")! }
        var logMetadata: Logger.Metadata { ["item": "\(id)"] }
    }

    /// An in-memory queue: `due` items are claimed in order; records each claim's size.
    final class Queue: WorkQueue, Sendable {
        let state = Mutex<(due: [Item], claims: [Int], done: [Int])>(([], [], []))
        let ended = Mutex<(released: [Int], failed: [Int])>(([], []))
        /// While `hold` is set, recordings wait in `waiting` (a slow database).
        let recordings = Mutex<(hold: Bool, waiting: [CheckedContinuation<Void, Never>])>((false, []))
        var kind: String { "test" }
        func wakes(on message: BusMessage) -> Bool { false }
        func add(_ items: [Item]) { state.withLock { $0.due += items } }
        var claims: [Int] { state.withLock { $0.claims } }
        var done: [Int] { state.withLock { $0.done } }
        func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [Item] {
            state.withLock { state in
                let taken = Array(state.due.prefix(limit))
                state.due.removeFirst(taken.count)
                if !taken.isEmpty { state.claims.append(taken.count) }
                return taken
            }
        }
        func heartbeat(worker: String, organisation: UUID, claims: [Item], leaseSeconds: Int) async throws {}
        func complete(_ claim: Item, worker: String, startedAt: Date, outcome: Bool, logger: Logger) async throws -> Bool {
            await withCheckedContinuation { continuation in
                let waits = recordings.withLock { recordings in
                    if recordings.hold { recordings.waiting.append(continuation) }
                    return recordings.hold
                }
                if !waits { continuation.resume() }
            }
            state.withLock { $0.done.append(claim.id) }
            return true
        }
        func release(_ claim: Item, worker: String, until: Date, reason: String) async throws -> Bool {
            ended.withLock { $0.released.append(claim.id) }
            return true
        }
        func fail(_ claim: Item, worker: String, error: any Error) async throws { ended.withLock { $0.failed.append(claim.id) } }
        func rescueExpired(worker: String) async throws -> Int { 0 }
        var waitingRecordings: Int { recordings.withLock { $0.waiting.count } }
        func holdRecordings() { recordings.withLock { $0.hold = true } }
        func recordAll() {
            for continuation in recordings.withLock({ recordings in
                defer { recordings = (false, []) }; return recordings.waiting
            }) { continuation.resume() }
        }
    }

    struct Failure: Error {}

    /// Items below 100 finish at once; 100–199 hold their slot until `release`; 200–299 throw;
    /// 300 and above are given back.
    final class Handler: WorkHandler, Sendable {
        let held = Mutex<[CheckedContinuation<Void, Never>]>([])
        let handled = Mutex(0)
        func handle(_ claim: Item, logger: Logger) async throws -> WorkDisposition<Bool> {
            if claim.id >= 300 { return .giveBack(until: Date(), reason: "test") }
            if claim.id >= 200 { throw Failure() }
            if claim.id >= 100 { await withCheckedContinuation { continuation in held.withLock { $0.append(continuation) } } }
            handled.withLock { $0 += 1 }
            return .done(true)
        }
        func finished(_ claim: Item, disposition: WorkDisposition<Bool>?, recorded: Bool?, duration: Duration, logger: Logger) {}
        func release() {
            for continuation in held.withLock({ held in
                defer { held = [] }; return held
            }) { continuation.resume() }
        }
    }

    func waitFor(_ condition: () -> Bool) async throws {
        for _ in 0..<500 where !condition() { try await Task.sleep(for: .milliseconds(10)) }
    }

    func runner(_ queue: Queue, _ handler: Handler, slots: Int, poll: Duration) -> WorkRunner<Queue, Handler> {
        var configuration = WorkRunnerConfiguration(name: "claims-test")
        configuration.concurrency = slots
        configuration.batchSize = slots
        configuration.pollInterval = poll
        // A bus that is never run: the runner wakes on finished items and polls.
        let client = PostgresClient(
            configuration: .init(host: "127.0.0.1", port: 1, username: "nobody", password: nil, database: nil, tls: .disable))
        return WorkRunner(
            configuration: configuration, queue: queue, handler: handler,
            bus: NotificationBus(client: client, logger: Logger(label: "test")), logger: Logger(label: "test"))
    }

    @Test("while items run, fewer free slots than half a batch are not claimed when items end (8 slots: 2 free wait, 4 free are claimed)")
    func halfABatch() async throws {
        let queue = Queue()
        let handler = Handler()
        // A poll interval longer than the test: only finished items wake the loop.
        let running = Task { try await runner(queue, handler, slots: 8, poll: .seconds(60)).run() }
        defer { running.cancel() }
        queue.add((100..<106).map { Item(id: $0) } + (1...20).map { Item(id: $0) })
        try await waitFor { queue.done.count == 2 }
        // Two fast items ended, two slots free, and more is due: a quarter-batch rule claimed them.
        try await Task.sleep(for: .milliseconds(300))
        #expect(queue.claims == [8], "\(queue.claims)")
        // The slow items end: the free slots are claimed, and every item runs.
        handler.release()
        try await waitFor { queue.done.count == 26 }
        #expect(Set(queue.done) == Set((100..<106).map { $0 } + (1...20).map { $0 }))
    }

    @Test("with 3 of 4 slots held by slow sends, the free slot is claimed once it has waited a poll interval, before any slow send ends")
    func freeSlotsDoNotWaitForSlowSends() async throws {
        let queue = Queue()
        let handler = Handler()
        let running = Task { try await runner(queue, handler, slots: 4, poll: .milliseconds(100)).run() }
        defer { running.cancel() }

        // Three slow items and one fast one take the four slots in one claim.
        queue.add([Item(id: 100), Item(id: 101), Item(id: 102), Item(id: 1)])
        try await waitFor { queue.done == [1] }
        #expect(queue.claims == [4])
        // One slot is free: fewer than half a batch (2). Work arrives; the slow sends still run.
        queue.add([Item(id: 2), Item(id: 3)])
        try await waitFor { queue.done.count == 3 }
        #expect(queue.done == [1, 2, 3], "the free slot was claimed while the slow sends held the others")
        #expect(queue.claims.dropFirst().allSatisfy { $0 == 1 })
        handler.release()
        try await waitFor { queue.done.count == 6 }
        #expect(Set(queue.done) == [1, 2, 3, 100, 101, 102])
    }

    @Test("an item being recorded leaves its slot to the next send; at most as many again wait for their recording")
    func recordingFreesTheSlot() async throws {
        let queue = Queue()
        let handler = Handler()
        queue.holdRecordings()
        let running = Task { try await runner(queue, handler, slots: 4, poll: .milliseconds(50)).run() }
        defer { running.cancel() }
        queue.add((1...20).map { Item(id: $0) })
        // The database holds every recording: the first 4 sends end and wait, the next 4 are
        // claimed and sent, and then the runner stops claiming (8 leases held for 4 slots).
        try await waitFor { queue.waitingRecordings == 8 }
        try await Task.sleep(for: .milliseconds(300))
        #expect(handler.handled.withLock { $0 } == 8)
        #expect(queue.claims.reduce(0, +) == 8, "\(queue.claims)")
        #expect(queue.done.isEmpty)
        queue.recordAll()
        try await waitFor { queue.done.count == 20 }
        #expect(Set(queue.done) == Set(1...20))
    }

    @Test("items that throw or are given back leave their slots: 2 slots serve 6 failures, 6 give-backs and 6 sends")
    func failuresLeaveTheirSlots() async throws {
        let queue = Queue()
        let handler = Handler()
        let running = Task { try await runner(queue, handler, slots: 2, poll: .milliseconds(50)).run() }
        defer { running.cancel() }
        queue.add((200..<206).map { Item(id: $0) } + (300..<306).map { Item(id: $0) } + (1...6).map { Item(id: $0) })
        try await waitFor { queue.done.count == 6 }
        #expect(Set(queue.done) == Set(1...6))
        let ended = queue.ended.withLock { $0 }
        #expect(Set(ended.failed) == Set(200..<206) && Set(ended.released) == Set(300..<306))
    }
}
