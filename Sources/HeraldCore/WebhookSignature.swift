import Crypto
import Foundation

/// A Standard Webhooks signing secret: "whsec_" followed by the standard base64 of the key bytes.
/// https://www.standardwebhooks.com — the spec asks for 24–64 byte keys; that range is enforced.
public struct WebhookSecret: Sendable, Equatable, CustomStringConvertible {
    public static let prefix = "whsec_"

    /// The raw HMAC key.
    public let keyBytes: [UInt8]

    public init?(string: String) {
        guard string.hasPrefix(Self.prefix),
            let data = Data(base64Encoded: String(string.dropFirst(Self.prefix.count))),
            (24...64).contains(data.count)
        else { return nil }
        keyBytes = Array(data)
    }

    public init?(keyBytes: [UInt8]) {
        guard (24...64).contains(keyBytes.count) else { return nil }
        self.keyBytes = keyBytes
    }

    /// 32 fresh random bytes.
    public static func generate() -> WebhookSecret {
        let key = SymmetricKey(size: .bits256)
        return WebhookSecret(uncheckedKeyBytes: key.withUnsafeBytes { Array($0) })
    }

    /// "whsec_<base64>", for showing to the subscriber once and for storage.
    public var string: String { Self.prefix + Data(keyBytes).base64EncodedString() }

    /// Redacted so a secret never lands in a log line by accident.
    public var description: String { "whsec_<redacted>" }

    private init(uncheckedKeyBytes: [UInt8]) { keyBytes = uncheckedKeyBytes }
}

/// Signs outgoing webhooks per Standard Webhooks: HMAC-SHA256 over "{msg_id}.{timestamp}.{payload}".
public enum WebhookSigner {
    public static let idHeader = "webhook-id"
    public static let timestampHeader = "webhook-timestamp"
    public static let signatureHeader = "webhook-signature"

    /// The three headers for one delivery attempt. `webhook-signature` carries one "v1,<base64>" entry per
    /// secret, space-separated, so during rotation both the old and the new secret sign and receivers
    /// holding either one verify.
    public static func headers(
        id: String, timestamp: Date, body: some DataProtocol, secrets: [WebhookSecret]
    ) -> [(String, String)] {
        let seconds = unixSeconds(timestamp)
        let signatures = secrets.map { "v1," + signature(id: id, timestamp: seconds, body: body, secret: $0) }
        return [
            (idHeader, id),
            (timestampHeader, String(seconds)),
            (signatureHeader, signatures.joined(separator: " ")),
        ]
    }

    /// Base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}") — without the "v1," prefix.
    public static func signature(id: String, timestamp: Int64, body: some DataProtocol, secret: WebhookSecret) -> String {
        Data(mac(id: id, timestamp: timestamp, body: body, secret: secret)).base64EncodedString()
    }

    /// Receiver-side check (used by tests, and handy for a "verify your endpoint" tool). True if any "v1,"
    /// entry in `signatureHeader` matches (constant-time) and, when `now` is given, the timestamp is within
    /// `tolerance` seconds of it (the spec's replay window).
    public static func verify(
        id: String, timestamp: Int64, body: some DataProtocol, signatureHeader: String, secret: WebhookSecret,
        now: Date? = nil, tolerance: Int64 = 300
    ) -> Bool {
        if let now, abs(unixSeconds(now) - timestamp) > tolerance { return false }
        let expected = mac(id: id, timestamp: timestamp, body: body, secret: secret)
        var matched = false
        for entry in signatureHeader.split(separator: " ") {
            let parts = entry.split(separator: ",", maxSplits: 1)
            guard parts.count == 2, parts[0] == "v1", let given = Data(base64Encoded: String(parts[1])) else { continue }
            // Evaluate every entry (no early exit) and compare without short-circuiting on the first difference.
            matched = constantTimeEqual(Array(given), expected) || matched
        }
        return matched
    }

    private static func mac(id: String, timestamp: Int64, body: some DataProtocol, secret: WebhookSecret) -> [UInt8] {
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: secret.keyBytes))
        hmac.update(data: Data("\(id).\(timestamp).".utf8))
        hmac.update(data: body)
        return Array(hmac.finalize())
    }

    private static func unixSeconds(_ date: Date) -> Int64 {
        Int64(date.timeIntervalSince1970.rounded(.down))
    }

    private static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }
}
