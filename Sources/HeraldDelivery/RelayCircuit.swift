import Foundation
import Synchronization

/// The mail relay's circuit breaker, in this process: the SMTP server is one for every
/// organisation, and while it does not answer, each email sent into the silence used an attempt,
/// so an outage longer than the retry schedule (about 21 minutes by default) turned every email
/// DEAD (an operator's trial). After `threshold` sends in a row without an answer (no connection,
/// a timeout; a refusal is an answer) the circuit opens: emails claimed meanwhile are given back
/// unattempted until `cooldown` has passed, then one send tries the relay (the others wait a
/// moment) and its answer closes the circuit or opens it again.
public final class RelayCircuit: Sendable {
    public enum Admission: Equatable, Sendable {
        case send
        /// Give the email back until then.
        case wait(until: Date, reason: String)
    }

    private struct State {
        var failures = 0
        var openUntil: Date?
        var trialRunning = false
    }

    let threshold: Int
    let cooldown: TimeInterval
    /// How long an email waits while another one tries the relay.
    let trialWait: TimeInterval
    private let state = Mutex(State())

    public init(threshold: Int, cooldown: TimeInterval, trialWait: TimeInterval = 1) {
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self.trialWait = trialWait
    }

    /// Whether an email may be sent now.
    public func admit(now: Date) -> Admission {
        state.withLock { state in
            guard let until = state.openUntil else { return .send }
            if now < until {
                return .wait(until: until, reason: "the mail server gave no answer to \(threshold) sends in a row; paused")
            }
            if state.trialRunning { return .wait(until: now.addingTimeInterval(trialWait), reason: "a send is trying the mail server") }
            state.trialRunning = true
            return .send
        }
    }

    /// What a send learnt: `answered` true (any reply, even a refusal), false (no answer), nil
    /// (nothing about the relay). Returns true when this opened the circuit.
    @discardableResult
    public func record(answered: Bool?, now: Date) -> Bool {
        guard let answered else {
            state.withLock { $0.trialRunning = false }
            return false
        }
        return state.withLock { state in
            state.trialRunning = false
            if answered {
                state = State()
                return false
            }
            state.failures += 1
            let wasOpen = state.openUntil != nil
            if state.failures >= threshold || wasOpen {
                state.openUntil = now.addingTimeInterval(cooldown)
                return !wasOpen
            }
            return false
        }
    }

    public var isOpen: Bool { state.withLock { $0.openUntil != nil } }
}
