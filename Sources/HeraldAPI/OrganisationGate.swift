import Foundation
import Metrics
import Synchronization

/// How many API requests of one organisation this instance runs in the database at once
/// (issue 12, fairness). Rate limits bound an organisation's requests per second; they do not
/// stop its accepted requests from arriving together (a client that waits `Retry-After` sends
/// its whole backlog again a second later) and taking every connection and every core of the
/// database for a while. While another organisation uses the instance, an organisation's
/// requests past `limit` wait here, in order, before they take a connection, so the other's
/// request finds one free and competes with at most `limit` of theirs. Past `queueLimit`
/// waiting, a request is refused with a 429.
///
/// The bound holds only while it protects someone (work-conserving, like a fair scheduler): an
/// organisation alone on the instance runs as many requests at once as it sends. The instance
/// is shared while another organisation has a request running, and for `window` after requests
/// of two organisations followed each other, so an organisation that sends now and then is
/// protected between its requests too.
///
/// Each organisation has three lanes, each with its own bound: its users' own feed
/// (`/v1/me/notifications…`, the bell), its other calls (its integration's and admins'), so a
/// batch of large notifies does not hold up its users' bells, and calls with an API key the
/// database has not accepted in the last 30 s, so forged keys naming an organisation cannot take
/// the places of its proven requests. Per instance, like the rate limits.
public final class OrganisationGate: Sendable {
    public let limit: Int
    public let queueLimit: Int
    /// How long the instance counts as shared after requests of two organisations met.
    public let window: TimeInterval
    private let now: @Sendable () -> Date

    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Void, any Error>
    }

    private struct Lane {
        var running = 0
        var waiting: [Waiter] = []
    }

    /// Which requests wait in line together: an organisation's, of one kind.
    public struct LaneKey: Hashable, Sendable {
        public var organisationID: UUID
        public var kind: Kind

        public enum Kind: Hashable, Sendable {
            /// Its users' own feed (`/v1/me/notifications…`).
            case ownFeed
            /// Its other calls, with a proven credential.
            case calls
            /// Calls with an API key the database has not accepted lately: forged keys naming
            /// the organisation wait here, not in its other lanes.
            case unproven
        }

        public init(organisationID: UUID, kind: Kind) {
            self.organisationID = organisationID
            self.kind = kind
        }
    }

    private struct State {
        var lanes: [LaneKey: Lane] = [:]
        /// Requests running per organisation, in its proven lanes.
        var running: [UUID: Int] = [:]
        /// The organisation of the last proven request that came in.
        var last: UUID?
        /// Until when the instance counts as shared since two organisations' requests met.
        var sharedUntil = Date.distantPast
        var nextID: UInt64 = 0

        /// Whether a lane's requests say who uses the instance. Unproven keys do not: a trickle
        /// of forged keys naming made-up organisations would keep every instance shared.
        static func counts(_ key: LaneKey) -> Bool { key.kind != .unproven }

        /// Whether another organisation than `organisation` uses the instance.
        func shared(for organisation: UUID, at now: Date) -> Bool {
            now < sharedUntil || running.count > 1 || (running.count == 1 && running[organisation] == nil)
        }

        /// A proven request of `key`'s organisation came in at `now`.
        mutating func arrived(_ key: LaneKey, at now: Date, window: TimeInterval) {
            guard Self.counts(key) else { return }
            if let last, last != key.organisationID { sharedUntil = now.addingTimeInterval(window) }
            last = key.organisationID
        }

        mutating func started(_ key: LaneKey) {
            if Self.counts(key) { running[key.organisationID, default: 0] += 1 }
        }

        mutating func stopped(_ key: LaneKey) {
            guard Self.counts(key), let count = running[key.organisationID] else { return }
            running[key.organisationID] = count > 1 ? count - 1 : nil
        }

        /// Lets in the lane's first waiters while its bound allows: one as a place frees, all
        /// of them once the organisation is alone. The caller resumes them.
        mutating func admitWaiters(_ key: LaneKey, at now: Date, limit: Int) -> [Waiter] {
            guard var lane = lanes[key], !lane.waiting.isEmpty else { return [] }
            let bound = shared(for: key.organisationID, at: now) ? limit : .max
            var admitted: [Waiter] = []
            while lane.running < bound, !lane.waiting.isEmpty {
                admitted.append(lane.waiting.removeFirst())
                lane.running += 1
                started(key)
            }
            lanes[key] = lane
            return admitted
        }
    }

    private let state = Mutex(State())

    static let waits = Counter(label: "herald_organisation_gate_waits_total")
    static let refusals = Counter(label: "herald_organisation_gate_refusals_total")

    /// `limit` requests of one organisation at once while the instance is shared (at least 1;
    /// 0: no bound); `queueLimit` more waiting; shared for `window` seconds after two
    /// organisations' requests met.
    public init(limit: Int, queueLimit: Int, window: TimeInterval = 1, now: @escaping @Sendable () -> Date = { Date() }) {
        self.limit = limit <= 0 ? .max : limit
        self.queueLimit = max(0, queueLimit)
        self.window = window
        self.now = now
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
        let at = now()
        let id = state.withLock { state in
            state.nextID &+= 1
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let (outcome, admitted): (Result<Void, any Error>?, [Waiter]) = state.withLock { state in
                    state.arrived(key, at: at, window: window)
                    // Those waiting first: the bound may have risen since they came (the
                    // organisation is alone now).
                    let admitted = state.admitWaiters(key, at: at, limit: limit)
                    var lane = state.lanes[key] ?? Lane()
                    let bound = state.shared(for: key.organisationID, at: at) ? limit : .max
                    if lane.waiting.isEmpty, lane.running < bound {
                        lane.running += 1
                        state.lanes[key] = lane
                        state.started(key)
                        return (.success(()), admitted)
                    }
                    // A cancellation flags the task before its handler runs, and the handler
                    // takes this lock: checked here, no waiter is left behind.
                    if Task.isCancelled { return (.failure(CancellationError()), admitted) }
                    guard lane.waiting.count < queueLimit else {
                        let detail =
                            "Too many of your organisation's requests are in progress on this instance at once (\(lane.running) running, \(lane.waiting.count) waiting); retry after 1 s."
                        return (.failure(APIError.tooManyRequests(detail, retryAfter: 1)), admitted)
                    }
                    lane.waiting.append(Waiter(id: id, continuation: continuation))
                    state.lanes[key] = lane
                    return (nil, admitted)
                }
                for waiter in admitted { waiter.continuation.resume() }
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

    /// Gives the place back, then lets in as many of the lane's waiters as its bound now allows;
    /// when the organisation's last request ends, other organisations may be alone now, so their
    /// waiters too.
    private func leave(_ key: LaneKey) {
        let at = now()
        let admitted: [Waiter] = state.withLock { state in
            guard var lane = state.lanes[key] else { return [] }
            lane.running -= 1
            state.lanes[key] = lane
            state.stopped(key)
            var admitted = state.admitWaiters(key, at: at, limit: limit)
            if State.counts(key), state.running[key.organisationID] == nil {
                for other in Array(state.lanes.keys) where other != key && state.lanes[other]?.waiting.isEmpty == false {
                    admitted += state.admitWaiters(other, at: at, limit: limit)
                }
            }
            if let left = state.lanes[key], left.running == 0, left.waiting.isEmpty { state.lanes[key] = nil }
            return admitted
        }
        for waiter in admitted { waiter.continuation.resume() }
    }
}
