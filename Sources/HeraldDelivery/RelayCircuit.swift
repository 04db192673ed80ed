import Foundation
import Logging
import Synchronization

/// The mail relay's circuit breaker, in this process: the SMTP server is one for every
/// organisation, and while it does not answer, each email sent into the silence used an attempt,
/// so an outage longer than the retry schedule (about 21 minutes by default) turned every email
/// DEAD (an operator's trial). After `threshold` sends in a row without an answer (no connection,
/// a timeout; any reply, a refusal too, is an answer) the circuit opens: the email transport
/// pauses the sends it is given (`SendOutcome.paused`) until `cooldown` has passed, then lets one
/// send try the relay, pushing the pause on by a cool-down for the others; that send's answer
/// closes the circuit, its silence opens it again. The transport asks just before connecting, so
/// sends that were waiting for a connection when it opened are paused too.
public final class RelayCircuit: Sendable {
    public enum Admission: Equatable, Sendable {
        case send
        /// Send, as the trial of a circuit that was open: report with `trial: true`.
        case trial
        /// Do not send; give the message back until then.
        case wait(until: Date, reason: String)
    }

    private struct State {
        var failures = 0
        var openUntil: Date?
        var trialRunning = false
    }

    let threshold: Int
    let cooldown: TimeInterval
    private let state = Mutex(State())
    private let logger = Logger(label: "herald.smtp")

    public init(threshold: Int, cooldown: TimeInterval) {
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
    }

    /// Whether a message may be sent now.
    public func admit(now: Date) -> Admission {
        state.withLock { state in
            guard let until = state.openUntil else { return .send }
            if now < until || state.trialRunning {
                return .wait(
                    until: max(until, now.addingTimeInterval(1)),
                    reason: "the mail server gave no answer to \(threshold) sends in a row; paused until it answers")
            }
            state.trialRunning = true
            // The others wait a cool-down more while the trial runs (at most the SMTP timeout).
            state.openUntil = now.addingTimeInterval(cooldown)
            return .trial
        }
    }

    /// What a send learnt of the relay: `answered` true (any reply), false (no answer), nil
    /// (nothing: the send did not reach it). `trial`: the send `admit` made the trial.
    public func record(answered: Bool?, trial: Bool, now: Date) {
        let opened = state.withLock { state -> Bool in
            if trial { state.trialRunning = false }
            switch answered {
            case true?:
                state = State()
                return false
            case false?:
                state.failures += 1
                let wasOpen = state.openUntil != nil
                if state.failures >= threshold || wasOpen { state.openUntil = now.addingTimeInterval(cooldown) }
                return !wasOpen && state.openUntil != nil
            case nil:
                // A trial that proved nothing: the next send may try again at once.
                if trial { state.openUntil = now }
                return false
            }
        }
        if opened {
            logger.warning(
                "mail server circuit opened: emails wait unattempted until it answers",
                metadata: ["failures": "\(threshold)", "cooldown_seconds": "\(cooldown)"])
        }
    }

    public var isOpen: Bool { state.withLock { $0.openUntil != nil } }
}
