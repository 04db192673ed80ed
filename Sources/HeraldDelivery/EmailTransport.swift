import Dispatch
import Foundation
import Synchronization

/// Sends email over SMTP through libcurl. Each send borrows a connection from a small pool (so
/// libcurl reuses the TCP/TLS session across messages) and runs on a Dispatch thread: libcurl
/// blocks, and the cooperative pool must not.
public final class EmailTransport: Sendable {
    public let settings: SMTPSettings
    /// The From address when the organisation has not set one.
    public let defaultFrom: String
    private let idle = Mutex<[SMTPConnection]>([])
    private let queue = DispatchQueue(label: "herald.smtp", attributes: .concurrent)

    public init(settings: SMTPSettings, defaultFrom: String) {
        self.settings = settings
        self.defaultFrom = defaultFrom
    }

    /// `smtp://host:port` (plain; `?starttls=required` upgrades) or `smtps://host:port` (implicit TLS).
    public static func settings(url: String, username: String?, password: String?, timeout: TimeInterval) -> SMTPSettings? {
        guard let components = URLComponents(string: url), let host = components.host, let scheme = components.scheme?.lowercased() else {
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
        await withCheckedContinuation { (continuation: CheckedContinuation<SendOutcome, Never>) in
            queue.async {
                continuation.resume(returning: self.sendBlocking(from: from, to: recipient, message: message))
            }
        }
    }

    /// The outcome's `error` is `SMTPError.description`: a sentence for the tenant admin, never a dump.
    private func sendBlocking(from: String, to recipient: String, message: [UInt8]) -> SendOutcome {
        var connection: SMTPConnection?
        do throws(SMTPError) {
            let used: SMTPConnection
            if let reused = idle.withLock({ $0.popLast() }) { used = reused } else { used = try SMTPConnection(settings: settings) }
            connection = used
            let reply = try used.send(from: from, to: [recipient], message: message)
            idle.withLock { $0.append(used) }
            return .accepted(code: reply.code, response: "\(reply.code) \(reply.text)")
        } catch {
            switch error {
            case .refused(let code, _, _):
                return .refused(code: code, error: error.description, permanent: error.isPermanent, retryAfter: nil)
            case .smtputf8Unsupported, .invalidEnvelope:
                // Refused before any transfer: the connection is still good.
                if let connection { idle.withLock { $0.append(connection) } }
                return .refused(code: nil, error: error.description, permanent: true, retryAfter: nil)
            case .transport:
                return .refused(code: nil, error: error.description, permanent: error.isPermanent, retryAfter: nil)
            }
        }
    }
}
