import Synchronization
import Testing

@testable import HeraldDelivery

@Suite("Request batcher")
struct RequestBatcherTests {
    struct Refused: Error {}

    @Test("requests made while a batch runs go together in the next; each gets its own answer, in order")
    func batchesAndAnswers() async throws {
        let batches = Mutex<[[Int]]>([])
        let batcher = RequestBatcher<Int, Int>(maximum: 100) { requests in
            batches.withLock { $0.append(requests) }
            try? await Task.sleep(for: .milliseconds(20))
            return requests.map { .success($0 * 10) }
        }
        let answers = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
            for n in 0..<50 { group.addTask { (n, try await batcher.submit(n)) } }
            var answers: [Int: Int] = [:]
            for try await (n, answer) in group { answers[n] = answer }
            return answers
        }
        #expect(answers.count == 50 && answers.allSatisfy { $0.value == $0.key * 10 })
        let seen = batches.withLock { $0 }
        #expect(seen.flatMap { $0 }.sorted() == Array(0..<50), "every request ran exactly once")
        #expect(seen.count < 50, "requests made together share batches: \(seen.map(\.count))")
    }

    @Test("a batch holds at most its maximum")
    func maximum() async throws {
        let sizes = Mutex<[Int]>([])
        let batcher = RequestBatcher<Int, Int>(maximum: 4) { requests in
            sizes.withLock { $0.append(requests.count) }
            return requests.map { .success($0) }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for n in 0..<30 {
                group.addTask {
                    let answer = try await batcher.submit(n)
                    #expect(answer == n)
                }
            }
            try await group.waitForAll()
        }
        #expect(sizes.withLock { $0.allSatisfy { $0 <= 4 } && $0.reduce(0, +) == 30 })
    }

    @Test("one group's failure fails only its own requests")
    func failureIsPerGroup() async throws {
        let batcher = RequestBatcher<Int, Int>(maximum: 100) { requests in
            await RequestBatcher<Int, Int>.perOrganisation(requests, key: { $0 % 2 }) { parity, group in
                if parity == 1 { throw Refused() }
                return group.map { $0 + 1 }
            }
        }
        let results = await withTaskGroup(of: (Int, Int?).self) { group in
            for n in 0..<20 { group.addTask { (n, try? await batcher.submit(n)) } }
            var results: [Int: Int?] = [:]
            for await (n, answer) in group { results[n] = answer }
            return results
        }
        #expect(results.count == 20)
        for (n, answer) in results { #expect(answer == (n % 2 == 0 ? n + 1 : nil)) }
    }

    @Test("the organisations of one batch run at the same time", .timeLimit(.minutes(1)))
    func organisationsRunTogether() async throws {
        // Each organisation's body waits until both have started: run one after the other, the
        // first would wait for ever (and the time limit fail the test).
        let latch = Latch(parties: 2)
        let results = await RequestBatcher<Int, Int>.perOrganisation([0, 1, 2, 3], key: { $0 % 2 }) { _, group in
            await latch.arriveAndWait()
            return group.map { $0 * 10 }
        }
        let answers = try results.map { try $0.get() }
        #expect(answers == [0, 10, 20, 30], "answers in the batch's order")
    }
}

/// Lets `parties` tasks wait until all of them have arrived.
final class Latch: Sendable {
    private let state: Mutex<(arrived: Int, waiting: [CheckedContinuation<Void, Never>])>
    private let parties: Int

    init(parties: Int) {
        self.parties = parties
        state = Mutex((0, []))
    }

    func arriveAndWait() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let ready: [CheckedContinuation<Void, Never>] = state.withLock { state in
                state.arrived += 1
                state.waiting.append(continuation)
                guard state.arrived >= parties else { return [] }
                defer { state.waiting = [] }
                return state.waiting
            }
            for waiter in ready { waiter.resume() }
        }
    }
}
