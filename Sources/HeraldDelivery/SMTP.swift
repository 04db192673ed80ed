import Foundation

/// Where and how to submit mail over SMTP.
public struct SMTPSettings: Sendable, Equatable {
    /// How the connection is protected.
    public enum Security: Sendable, Equatable {
        /// No TLS at all (local relays and tests only).
        case plain
        /// Plain connection upgraded with STARTTLS; refuses to continue if the server does not offer it.
        case startTLS
        /// TLS from the first byte (SMTPS, usually port 465).
        case implicitTLS
    }

    /// Server host name or IP address (IPv6 without brackets).
    public var host: String
    /// Server port, typically 25, 587 (startTLS) or 465 (implicitTLS).
    public var port: Int
    /// Connection protection.
    public var security: Security
    /// User name for SMTP AUTH; nil sends no AUTH.
    public var username: String?
    /// Password for SMTP AUTH.
    public var password: String?
    /// Limit for connecting and, separately, for one whole send (seconds).
    public var timeout: TimeInterval
    /// Whether to verify the server's certificate and host name.
    public var verifyPeer: Bool
    /// Name announced in EHLO; libcurl says `EHLO localhost` when nil.
    public var clientName: String?

    /// Settings for one SMTP server.
    public init(
        host: String,
        port: Int,
        security: Security,
        username: String? = nil,
        password: String? = nil,
        timeout: TimeInterval = 30,
        verifyPeer: Bool = true,
        clientName: String? = nil
    ) {
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self.password = password
        self.timeout = timeout
        self.verifyPeer = verifyPeer
        self.clientName = clientName
    }
}

/// The server's final reply to a message, i.e. the answer to the end of DATA.
public struct SMTPReply: Sendable, Equatable {
    /// Three-digit reply code, e.g. 250.
    public var code: Int
    /// Reply text after the code, e.g. `2.0.0 Ok: queued as 4C1F2A`.
    public var text: String

    /// A reply with the given code and text.
    public init(code: Int, text: String) {
        self.code = code
        self.text = text
    }
}

/// Why a send failed.
public enum SMTPError: Error, Sendable, Equatable {
    /// The server answered a command with a 4xx/5xx reply; `command` is the verb it answered
    /// (`MAIL`, `RCPT`, `DATA` for DATA and the end of the message, `AUTH`, `EHLO`…; "" for the greeting).
    case refused(code: Int, text: String, command: String)
    /// The exchange failed below the SMTP dialogue: DNS, TCP, TLS, timeout, protocol breakage.
    case transport(curlCode: Int, message: String, detail: String)
    /// The caller's envelope cannot be sent (e.g. CR/LF or a space in an address); a clause.
    case invalidEnvelope(String)
    /// The envelope has an internationalised address (RFC 6531) and the server does not offer SMTPUTF8.
    case smtputf8Unsupported(address: String)

    /// Retrying the same message cannot help: 5xx replies, a bad envelope, or a
    /// configuration failure (credentials, certificate, no STARTTLS). Always `!isTransient`.
    public var isPermanent: Bool { !isTransient }

    /// Whether a later retry may succeed (4xx replies, network trouble, timeouts).
    public var isTransient: Bool {
        switch self {
        case .refused(let code, _, _):
            return (400..<500).contains(code)
        case .transport(let curlCode, _, _):
            return Self.transientCurlCodes.contains(curlCode)
        case .invalidEnvelope, .smtputf8Unsupported:
            return false
        }
    }

    /// libcurl codes caused by the network or the server's state rather than by our
    /// configuration (bad URL, bad credentials, certificate problems, no STARTTLS offered).
    private static let transientCurlCodes: Set<Int> = [
        5, // CURLE_COULDNT_RESOLVE_PROXY
        6, // CURLE_COULDNT_RESOLVE_HOST
        7, // CURLE_COULDNT_CONNECT
        8, // CURLE_WEIRD_SERVER_REPLY (e.g. greeting garbled, connection cut mid-reply)
        28, // CURLE_OPERATION_TIMEDOUT
        35, // CURLE_SSL_CONNECT_ERROR (handshake cut off)
        52, // CURLE_GOT_NOTHING
        55, // CURLE_SEND_ERROR
        56, // CURLE_RECV_ERROR
    ]
}

extension SMTPError: CustomStringConvertible {
    /// A sentence a tenant admin understands; it becomes the delivery's error and DEAD reason
    /// (issue 8 item 9), so it never carries a Swift type or enum dump. The server's own reply or
    /// libcurl's message follows in parentheses for whoever runs the mail server.
    public var description: String {
        switch self {
        case .refused(let code, let text, let command):
            let reply = text.isEmpty ? "\(code)" : "\(code) \(text)"
            let what =
                switch command {
                case "RCPT": "the recipient address"
                case "MAIL": "the sender address"
                case "DATA": "the message"
                case "AUTH": "Herald's login; check the SMTP user name and password"
                default: "the connection"
                }
            let later = (400..<500).contains(code) ? "temporarily " : ""
            return "The mail server \(later)refused \(what) (\(reply))."
        case .transport(let curlCode, let message, let detail):
            let cause = detail.isEmpty || detail == message ? message : detail
            let sentence =
                switch curlCode {
                case 5, 6: "Herald could not find the mail server (DNS lookup failed)"
                case 7: "Herald could not connect to the mail server"
                case 28: "The mail server did not answer in time"
                case 8, 52, 55, 56: "The connection to the mail server broke off"
                case 60: "The mail server's TLS certificate could not be verified"
                case 35, 58, 59, 66, 80, 83, 90, 91: "The TLS connection to the mail server failed"
                case 64: "The mail server does not offer STARTTLS, which Herald's SMTP settings require"
                case 67: "The mail server refused Herald's login; check the SMTP user name and password"
                default: "Sending to the mail server failed"
                }
            return "\(sentence) (\(cause))."
        case .invalidEnvelope(let reason):
            return "The email cannot be sent: \(reason)."
        case .smtputf8Unsupported(let address):
            return
                "The mail server does not support internationalised email addresses (SMTPUTF8), so Herald cannot send to \(address.debugDescription)."
        }
    }
}
