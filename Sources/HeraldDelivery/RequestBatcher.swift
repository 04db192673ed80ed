import Synchronization

/// Gathers requests made at about the same moment into one batch, as a database's group commit
/// does: the first request starts a batch; every request made while that batch runs waits and
/// goes in the next one. Nothing waits on a timer, so a lone request runs at once and a busy
/// worker's requests share round trips (issue 12: one delivery cost about ten).
///
/// `run` answers a batch in order, one result per request, so one request's failure (one
/// organisation's transaction) fails only the requests it concerns.
final class RequestBatcher<Request: Sendable, Response: Sendable>: Sendable {
    typealias Waiter = CheckedContinuation<Response, any Error>

    private struct State {
        var waiting: [(request: Request, waiter: Waiter)] = []
        var running = false
    }

    private let state = Mutex(State())
    private let maximum: Int
    private let run: @Sendable ([Request]) async -> [Result<Response, any Error>]

    /// `maximum`: the most requests in one batch.
    init(maximum: Int, run: @escaping @Sendable ([Request]) async -> [Result<Response, any Error>]) {
        precondition(maximum > 0)
        self.maximum = maximum
        self.run = run
    }

    func submit(_ request: Request) async throws -> Response {
        try await withCheckedThrowingContinuation { waiter in
            let leads = state.withLock { state in
                state.waiting.append((request, waiter))
                guard !state.running else { return false }
                state.running = true
                return true
            }
            if leads { Task { await self.drain() } }
        }
    }

    /// Runs batches until nobody waits. Every waiter is resumed exactly once: taken out of the
    /// state under the lock, then answered.
    private func drain() async {
        // The requests made at the same moment as the first (a claimed batch starting) join it.
        await Task.yield()
        while true {
            let batch: [(request: Request, waiter: Waiter)]? = state.withLock { state in
                guard !state.waiting.isEmpty else {
                    state.running = false
                    return nil
                }
                let taken = Array(state.waiting.prefix(maximum))
                state.waiting.removeFirst(taken.count)
                return taken
            }
            guard let batch else { return }
            let results = await run(batch.map(\.request))
            precondition(results.count == batch.count, "a batch answers every request")
            for (entry, result) in zip(batch, results) { entry.waiter.resume(with: result) }
        }
    }
}

extension RequestBatcher {
    /// Runs `body` once per organisation of the batch with that organisation's requests, the
    /// organisations at the same time (each is its own tenant transaction), and puts their
    /// answers (or an organisation's error, for each of its requests) back in the batch's order.
    static func perOrganisation<Key: Hashable & Sendable>(
        _ requests: [Request], key: (Request) -> Key,
        _ body: @escaping @Sendable (Key, [Request]) async throws -> [Response]
    ) async -> [Result<Response, any Error>] {
        var results = [Result<Response, any Error>?](repeating: nil, count: requests.count)
        let groups = Dictionary(grouping: requests.indices, by: { key(requests[$0]) })
        await withTaskGroup(of: ([Int], Result<[Response], any Error>).self) { group in
            for (organisation, positions) in groups {
                let mine = positions.map { requests[$0] }
                group.addTask {
                    do {
                        return (positions, .success(try await body(organisation, mine)))
                    } catch {
                        return (positions, .failure(error))
                    }
                }
            }
            for await (positions, answers) in group {
                switch answers {
                case .success(let answers):
                    for (position, answer) in zip(positions, answers) { results[position] = .success(answer) }
                case .failure(let error):
                    for position in positions { results[position] = .failure(error) }
                }
            }
        }
        return results.map { $0 ?? .failure(BatchError.unanswered) }
    }
}

/// A batch's run gave no answer for a request (a bug in the run, never expected).
struct BatchError: Error {
    static let unanswered = BatchError()
}
