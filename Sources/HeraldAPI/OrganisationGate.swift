import Foundation
import Metrics
import Synchronization

/// How many API requests of one organisation this instance runs in the database at once
/// (issue 12, fairness). Rate limits bound an organisation's requests per second; they do not
/// stop its accepted requests from arriving together (a client that waits `Retry-After` sends
/// its whole backlog again a second later) and taking every connection and every core of the
/// database for a while. Past `limit`, an organisation's requests wait here, in order, before
/// they take a connection, so another organisation's request finds one free and competes with
/// at most `limit` of theirs. Past `queueLimit` waiting, a request is refused with a 429.
///
/// Each organisation has two lanes: its users' own feed (`/v1/me/notifications…`, the bell),
/// and everything else (its integration's and admins' calls), so a batch of large notifies does
/// not hold up its users' bells. Requests go to the organisation their credential names once the
/// credential is proven (a signed access token or link, or an API key the database accepted
/// lately); credentials not yet proven share one lane of their own, so forged keys naming an
/// organisation cannot take its places. Per instance, like the rate limits.
public final class OrganisationGate: Sendable {
    public let limit: Int
    public let queueLimit: Int

    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Void, any Error>
    }

    private struct Lane {
        var running = 0
        var waiting: [Waiter] = []
    }

    /// Which requests wait in line together.
    public struct LaneKey: Hashable, Sendable {
        /// nil: credentials not yet proven.
        public var organisationID: UUID?
        /// The users' own feed, apart from the organisation's other calls.
        public var ownFeed: Bool

        public init(organisationID: UUID?, ownFeed: Bool) {
            self.organisationID = organisationID
            self.ownFeed = ownFeed
        }
    }

    private struct State {
        var lanes: [LaneKey: Lane] = [:]
        var nextID: UInt64 = 0
    }

    private let state = Mutex(State())

    static let waits = Counter(label: "herald_organisation_gate_waits_total")
    static let refusals = Counter(label: "herald_organisation_gate_refusals_total")

    /// `limit` requests of one organisation at once (at least 1; 0: no bound); `queueLimit`
    /// more waiting.
    public init(limit: Int, queueLimit: Int) {
        self.limit = limit <= 0 ? .max : limit
        self.queueLimit = max(0, queueLimit)
    }

    /// No bound: every request runs at once.
    public static let open = OrganisationGate(limit: 0, queueLimit: 0)

    /// Runs `body` once the lane has a place: at once, after waiting its turn, or not at all
    /// (`APIError.tooManyRequests` when the queue is full, `CancellationError` when the task is
    /// cancelled while it waits).
    public func run<Result>(_ lane: LaneKey, _ body: () async throws -> Result) async throws -> Result {
        if limit == .max { return try await body() }
        try await enter(lane)
        defer { leave(lane) }
        return try await body()
    }

    /// Requests running and waiting in a lane, for tests and the metrics.
    public func load(_ lane: LaneKey) -> (running: Int, waiting: Int) {
        state.withLock { state in state.lanes[lane].map { ($0.running, $0.waiting.count) } ?? (0, 0) }
    }

    private func enter(_ key: LaneKey) async throws {
        let id = state.withLock { state in
            state.nextID &+= 1
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLock { state in
                    var lane = state.lanes[key] ?? Lane()
                    if lane.running < limit {
                        lane.running += 1
                        state.lanes[key] = lane
                        return .success(())
                    }
                    // A cancellation flags the task before its handler runs, and the handler
                    // takes this lock: checked here, no waiter is left behind.
                    if Task.isCancelled { return .failure(CancellationError()) }
                    guard lane.waiting.count < queueLimit else {
                        return .failure(
                            APIError.tooManyRequests(
                                "Too many of your organisation's requests are in progress on this instance at once (\(lane.running) running, \(lane.waiting.count) waiting); retry after 1 s.",
                                retryAfter: 1))
                    }
                    lane.waiting.append(Waiter(id: id, continuation: continuation))
                    state.lanes[key] = lane
                    return nil
                }
                switch outcome {
                case .none: Self.waits.increment()
                case .failure(let error as APIError):
                    Self.refusals.increment()
                    continuation.resume(throwing: error)
                case .some(let result): continuation.resume(with: result)
                }
            }
        } onCancel: {
            let waiter: Waiter? = state.withLock { state in
                guard var lane = state.lanes[key], let index = lane.waiting.firstIndex(where: { $0.id == id }) else { return nil }
                let waiter = lane.waiting.remove(at: index)
                state.lanes[key] = lane
                return waiter
            }
            waiter?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Hands the place to the lane's first waiter, or gives it back.
    private func leave(_ key: LaneKey) {
        let next: Waiter? = state.withLock { state in
            guard var lane = state.lanes[key] else { return nil }
            if !lane.waiting.isEmpty {
                let next = lane.waiting.removeFirst()
                state.lanes[key] = lane
                return next
            }
            lane.running -= 1
            state.lanes[key] = lane.running == 0 ? nil : lane
            return nil
        }
        next?.continuation.resume()
    }
}
