import NIOCore
import Synchronization

/// A sleep for deadlines: timers that are nearly always cancelled before they fire.
///
/// On Linux a cancelled `Task.sleep` keeps its task and its Dispatch timer (about 550 bytes)
/// until the deadline it was sleeping towards passes. Under a 30 s statement deadline that was
/// every statement of the last 30 s: heaptrack counted 47 634 such timers (26 MB) in a server
/// that had just opened 2 000 live streams. These sleeps are entries of `DeadlineWatch`, removed
/// when cancelled, so nothing outlives the call, and no event loop is woken to start or cancel one.
public enum EventLoopTimer {
    /// Returns after `duration`, or throws `CancellationError` as soon as the task is cancelled.
    public static func sleep(for duration: Duration) async throws {
        let sleeper = Sleeper()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let ticket = DeadlineWatch.shared.watch(until: .now() + .nanoseconds(duration.nanoseconds)) {
                    sleeper.end(cancelled: false)
                }
                sleeper.wait(continuation, ticket: ticket)
            }
        } onCancel: {
            sleeper.end(cancelled: true)
        }
    }

    /// Who resumes the sleeper first: the deadline or a cancellation.
    private final class Sleeper: Sendable {
        private enum State {
            case starting
            case waiting(CheckedContinuation<Void, any Error>, DeadlineWatch.Ticket)
            /// Expired or cancelled before `wait`.
            case ended(cancelled: Bool)
            case done
        }
        private let state = Mutex<State>(.starting)

        func wait(_ continuation: CheckedContinuation<Void, any Error>, ticket: DeadlineWatch.Ticket) {
            let ended: Bool? = state.withLock { state in
                guard case .ended(let cancelled) = state else {
                    state = .waiting(continuation, ticket)
                    return nil
                }
                state = .done
                return cancelled
            }
            guard let ended else { return }
            if ended { DeadlineWatch.shared.cancel(ticket) }
            continuation.resume(with: ended ? .failure(CancellationError()) : .success(()))
        }

        func end(cancelled: Bool) {
            let waiting: (CheckedContinuation<Void, any Error>, DeadlineWatch.Ticket)? = state.withLock { state in
                switch state {
                case .starting:
                    state = .ended(cancelled: cancelled)
                    return nil
                case .waiting(let continuation, let ticket):
                    state = .done
                    return (continuation, ticket)
                case .ended, .done:
                    return nil
                }
            }
            guard let (continuation, ticket) = waiting else { return }
            if cancelled { DeadlineWatch.shared.cancel(ticket) }
            continuation.resume(with: cancelled ? .failure(CancellationError()) : .success(()))
        }
    }
}

extension Duration {
    /// Whole nanoseconds, at least zero (metrics, timers).
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        if seconds >= Int64.max / 1_000_000_000 { return Int64.max }
        return max(0, seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }

    /// Whole milliseconds, at least zero (run durations).
    public var milliseconds: Int64 { nanoseconds / 1_000_000 }
}
