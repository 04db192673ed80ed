import Foundation
import HeraldCore
import NIOPosix
import Synchronization

/// Sends email over SMTP through libcurl. Each send borrows a connection from a small pool (so
/// libcurl reuses the TCP/TLS session across messages) and runs on a thread of the transport's
/// own: libcurl blocks, and the cooperative pool must not. (A concurrent Dispatch queue ran at
/// most as many sends as the machine has cores: issue 12 measured 2 in flight on 2 cores.)
public final class EmailTransport: Sendable {
    public let settings: SMTPSettings
    /// The From address when the organisation has not set one.
    public let defaultFrom: String
    private let idle = Mutex<[SMTPConnection]>([])
    private let threads: NIOThreadPool
    /// The server's circuit breaker (a worker's; nil: every send is tried).
    let relay: RelayCircuit?

    /// `threads`: the sends that can be in flight at once (the worker passes its send slots).
    public init(settings: SMTPSettings, defaultFrom: String, threads: Int = 4, relay: RelayCircuit? = nil) {
        self.settings = settings
        self.defaultFrom = defaultFrom
        self.relay = relay
        self.threads = NIOThreadPool(numberOfThreads: max(1, threads))
        self.threads.start()
    }

    deinit {
        threads.shutdownGracefully { _ in }
    }

    /// `smtp://host:port` (plain; `?starttls=required` upgrades) or `smtps://host:port` (implicit TLS).
    /// nil for anything `SMTPURL.problem` refuses.
    public static func settings(url: String, username: String?, password: String?, timeout: TimeInterval) -> SMTPSettings? {
        guard SMTPURL.problem(url) == nil, let components = URLComponents(string: url), let host = components.host,
            let scheme = components.scheme?.lowercased()
        else {
            return nil
        }
        let starttls = components.queryItems?.first { $0.name == "starttls" }?.value == "required"
        let security: SMTPSettings.Security
        switch scheme {
        case "smtps": security = .implicitTLS
        case "smtp": security = starttls ? .startTLS : .plain
        default: return nil
        }
        return SMTPSettings(
            host: host, port: components.port ?? (scheme == "smtps" ? 465 : 25), security: security,
            username: username, password: password, timeout: timeout)
    }

    public func send(from: String, to recipient: String, message: [UInt8]) async -> SendOutcome {
        do {
            return try await threads.runIfActive {
                // Asked on the send's thread, just before connecting: a send that waited for a
                // thread while the circuit opened is paused too.
                let admission = self.relay?.admit(now: Date()) ?? .send
                if case .wait(let until, let reason) = admission { return .paused(until: until, reason: reason) }
                let (outcome, answered) = self.sendBlocking(from: from, to: recipient, message: message)
                self.relay?.record(answered: answered, trial: admission == .trial, now: Date())
                return outcome
            }
        } catch {
            // Only when the pool was shut down, which happens once nothing holds the transport.
            return .deferred(reason: "the email transport is shutting down")
        }
    }

    /// The outcome's `error` is `SMTPError.description`: a sentence for the tenant admin, never a
    /// dump. `answered`: whether the server replied (any reply, a refusal too), for the circuit;
    /// nil for a failure that says nothing of it (a certificate or setting problem).
    private func sendBlocking(from: String, to recipient: String, message: [UInt8]) -> (SendOutcome, answered: Bool?) {
        var connection: SMTPConnection?
        do throws(SMTPError) {
            let used: SMTPConnection
            if let reused = idle.withLock({ $0.popLast() }) { used = reused } else { used = try SMTPConnection(settings: settings) }
            connection = used
            let reply = try used.send(from: from, to: [recipient], message: message)
            idle.withLock { $0.append(used) }
            return (.accepted(code: reply.code, response: "\(reply.code) \(reply.text)"), true)
        } catch {
            switch error {
            case .refused(let code, _, _):
                return (.refused(code: code, error: error.description, permanent: error.isPermanent, retryAfter: nil), true)
            case .smtputf8Unsupported, .invalidEnvelope:
                // Refused before any transfer: the connection is still good.
                if let connection { idle.withLock { $0.append(connection) } }
                return (.refused(code: nil, error: error.description, permanent: true, retryAfter: nil), true)
            case .transport:
                return (
                    .refused(code: nil, error: error.description, permanent: error.isPermanent, retryAfter: nil),
                    error.isPermanent ? nil : false
                )
            }
        }
    }
}
