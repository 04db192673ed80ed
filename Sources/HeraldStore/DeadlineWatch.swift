import NIOCore
import NIOPosix
import Synchronization

/// Deadlines that nearly always pass unused, watched by one timer instead of one timer each.
///
/// Every database call, every statement and every delivery attempt runs under a deadline. As a
/// timer of its own on a NIO event loop, each cost two wake-ups of that loop from another thread,
/// one to schedule the timer and one to cancel it: two `eventfd` writes, and often two context
/// switches, per statement (`perf` of the worker and of the bell's reads, issue 12). The watch
/// keeps the deadlines in a table and schedules a timer for the earliest. Deadlines are nearly
/// always "now plus the same duration", later than the one already armed, so adding one and
/// cancelling one take a lock and wake nothing. Only a deadline earlier than the armed one
/// schedules another timer (the one it replaces is left to fire, finds nothing due and re-arms
/// nothing earlier). A timer fires at the earliest deadline exactly: what expires, expires on time.
public final class DeadlineWatch: Sendable {
    /// The process's watch, on one loop of NIO's shared event loop group.
    public static let shared = DeadlineWatch(on: MultiThreadedEventLoopGroup.singleton.next())

    /// A watched deadline, to cancel.
    public struct Ticket: Sendable, Hashable {
        fileprivate let id: UInt64
    }

    private struct Entry {
        var deadline: NIODeadline
        var expire: @Sendable () -> Void
    }

    private struct State {
        var last: UInt64 = 0
        var entries: [UInt64: Entry] = [:]
        /// When the earliest timer scheduled fires; nil when none is.
        var armed: NIODeadline?
    }

    private let state = Mutex(State())
    private let eventLoop: any EventLoop

    init(on eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    /// Calls `expire` on the watch's event loop at `deadline`, unless the ticket is cancelled first.
    public func watch(until deadline: NIODeadline, _ expire: @escaping @Sendable () -> Void) -> Ticket {
        let (ticket, arm) = state.withLock { state -> (Ticket, Bool) in
            state.last &+= 1
            state.entries[state.last] = Entry(deadline: deadline, expire: expire)
            let ticket = Ticket(id: state.last)
            if let armed = state.armed, armed <= deadline { return (ticket, false) }
            state.armed = deadline
            return (ticket, true)
        }
        if arm { schedule(at: deadline) }
        return ticket
    }

    /// Forgets the deadline; false when it had already expired (its `expire` ran or is running).
    @discardableResult
    public func cancel(_ ticket: Ticket) -> Bool {
        state.withLock { $0.entries.removeValue(forKey: ticket.id) != nil }
    }

    /// How many deadlines are watched (tests).
    var watched: Int { state.withLock { $0.entries.count } }

    private func schedule(at deadline: NIODeadline) {
        eventLoop.scheduleTask(deadline: deadline) { self.fire() }
    }

    /// A timer fired: expire what is due, and arm the next timer unless one as early is scheduled.
    private func fire() {
        let now = eventLoop.now
        let (expired, next) = state.withLock { state -> ([@Sendable () -> Void], NIODeadline?) in
            var due: [UInt64] = []
            var earliest: NIODeadline?
            for (id, entry) in state.entries {
                if entry.deadline <= now {
                    due.append(id)
                } else if earliest.map({ entry.deadline < $0 }) ?? true {
                    earliest = entry.deadline
                }
            }
            let expired = due.compactMap { state.entries.removeValue(forKey: $0)?.expire }
            // No timer still scheduled is due before now; one armed later than now still stands.
            if let armed = state.armed, armed <= now { state.armed = nil }
            guard let earliest, state.armed.map({ earliest < $0 }) ?? true else { return (expired, nil) }
            state.armed = earliest
            return (expired, earliest)
        }
        if let next { schedule(at: next) }
        for expire in expired { expire() }
    }
}

extension NIODeadline {
    /// The same instant on NIO's clock (both are monotonic; the difference from now carries over).
    init(_ instant: ContinuousClock.Instant) {
        self = .now() + .nanoseconds((instant - ContinuousClock.now).nanoseconds)
    }
}
