import Crypto
import Foundation

// Signed link tokens for click tracking and one-click unsubscribe:
//
//     base64url(JSON claims) "." kid "." base64url(HMAC-SHA256(key, payloadB64 "." kid))
//
// base64url is RFC 4648 §5 without padding. The MAC covers the payload's text exactly as sent.

/// One HMAC key, named by a short key ID that travels in the token so keys can rotate.
public struct LinkKey: Sendable {
    /// 1–16 characters of [A-Za-z0-9_-].
    public let id: String
    public let secret: SymmetricKey

    public static let minimumSecretBytes = 32

    public init(id: String, secret: [UInt8]) throws(LinkKeyRingError) {
        guard Self.isValidID(id) else { throw .invalidKeyID(id) }
        guard secret.count >= Self.minimumSecretBytes else { throw .secretTooShort(keyID: id, bytes: secret.count) }
        self.id = id
        self.secret = SymmetricKey(data: secret)
    }

    static func isValidID(_ id: some StringProtocol) -> Bool {
        (1...16).contains(id.utf8.count)
            && id.utf8.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "-"):
                    true
                default: false
                }
            }
    }
}

/// Configuration problems. Messages never include secret material.
public enum LinkKeyRingError: Error, Sendable, Equatable, CustomStringConvertible {
    case empty
    /// Entry number (1-based) is not "kid:secret".
    case malformedEntry(position: Int)
    case invalidKeyID(String)
    case invalidSecret(keyID: String)
    case secretTooShort(keyID: String, bytes: Int)
    case duplicateKeyID(String)

    public var description: String {
        switch self {
        case .empty:
            "The link key configuration is empty; expected \"kid:BASE64SECRET[,kid:BASE64SECRET…]\"."
        case .malformedEntry(let position):
            "Link key entry \(position) is not of the form \"kid:BASE64SECRET\"."
        case .invalidKeyID(let id):
            "Link key ID \"\(id)\" must be 1–16 characters of A–Z, a–z, 0–9, '_' or '-'."
        case .invalidSecret(let id):
            "The secret of link key \"\(id)\" is not valid base64."
        case .secretTooShort(let id, let bytes):
            "The secret of link key \"\(id)\" is \(bytes) bytes; at least \(LinkKey.minimumSecretBytes) are required."
        case .duplicateKeyID(let id):
            "Link key ID \"\(id)\" appears more than once."
        }
    }
}

/// The signing key plus every key that still verifies. The first configured key signs; later ones only
/// verify, so a rotation is "prepend the new key, drop the old one once its links have expired".
public struct LinkKeyRing: Sendable {
    public let current: LinkKey
    public let all: [String: LinkKey]

    public init(keys: [LinkKey]) throws(LinkKeyRingError) {
        guard let first = keys.first else { throw .empty }
        var all: [String: LinkKey] = [:]
        for key in keys {
            guard all[key.id] == nil else { throw .duplicateKeyID(key.id) }
            all[key.id] = key
        }
        self.current = first
        self.all = all
    }

    /// Parses "kid1:BASE64SECRET,kid0:BASE64SECRET". Whitespace around entries is ignored; secrets may use
    /// the standard or URL-safe base64 alphabet, with or without padding.
    public init(configuration: String) throws(LinkKeyRingError) {
        let text = configuration.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty else { throw .empty }
        var keys: [LinkKey] = []
        for (index, entry) in text.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            let parts = entry.trimmingCharacters(in: .whitespacesAndNewlines)
                .split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { throw .malformedEntry(position: index + 1) }
            let id = String(parts[0])
            guard LinkKey.isValidID(id) else { throw .invalidKeyID(id) }
            var base64 = parts[1].replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
            if !base64.hasSuffix("=") { base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4) }
            guard let secret = Data(base64Encoded: base64) else { throw .invalidSecret(keyID: id) }
            keys.append(try LinkKey(id: id, secret: Array(secret)))
        }
        try self.init(keys: keys)
    }

    /// A token for `claims`, signed with the current key.
    public func sign(_ claims: LinkClaims) -> String {
        let signedPart = base64URLEncodedString(claims.json.utf8) + "." + current.id
        let mac = HMAC<SHA256>.authenticationCode(for: Data(signedPart.utf8), using: current.secret)
        return signedPart + "." + base64URLEncodedString(mac)
    }

    /// The claims of a genuine, unexpired token of the expected scope; nil for anything else (malformed,
    /// unknown key ID, bad MAC, wrong scope, expired). Deliberately no reason: callers answer one 404 for all.
    public func verify(_ token: String, scope: LinkScope, now: Date) -> LinkClaims? {
        guard token.utf8.count <= 4096 else { return nil }
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let key = all[String(parts[1])],
            let mac = linkTokenBase64URLDecode(parts[2]), mac.count == SHA256.byteCount
        else { return nil }
        let signedPart = Data(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count))
        // Constant-time comparison inside swift-crypto.
        guard HMAC<SHA256>.isValidAuthenticationCode(mac, authenticating: signedPart, using: key.secret) else { return nil }
        // Only authenticated bytes reach the JSON decoder.
        guard let json = linkTokenBase64URLDecode(parts[0]),
            let claims = try? JSONDecoder().decode(LinkClaims.self, from: Data(json)),
            claims.scope == scope, now < claims.expiresAt
        else { return nil }
        return claims
    }
}

public enum LinkScope: String, Sendable, Codable, Equatable {
    case click
    case unsubscribe = "unsub"
    /// "Keep me subscribed" in an inactivity warning: following it is engagement.
    case keep
}

/// What a link token asserts. Encoded compactly: one-letter keys, UUIDs as 22-character base64url of their
/// 16 bytes, `expiresAt` as integer Unix seconds, absent optionals omitted.
public struct LinkClaims: Sendable, Equatable, Codable {
    public var scope: LinkScope
    public var organisationID: UUID
    public var userID: UUID
    public var deliveryID: UUID?
    /// The digest item a click in a digest is recorded against (a digest has no delivery per item).
    public var digestItemID: UUID?
    /// The digest run an unsubscribe link of a digest names: it unsubscribes from every category
    /// the digest carried.
    public var digestRunID: UUID?
    public var notificationID: UUID?
    public var categoryID: UUID?
    public var channel: String?
    /// Whole seconds (rounded down on init) so claims survive a round trip unchanged.
    public var expiresAt: Date

    public init(
        scope: LinkScope, organisationID: UUID, userID: UUID, deliveryID: UUID? = nil, digestItemID: UUID? = nil,
        digestRunID: UUID? = nil, notificationID: UUID? = nil, categoryID: UUID? = nil, channel: String? = nil, expiresAt: Date
    ) {
        self.scope = scope
        self.organisationID = organisationID
        self.userID = userID
        self.deliveryID = deliveryID
        self.digestItemID = digestItemID
        self.digestRunID = digestRunID
        self.notificationID = notificationID
        self.categoryID = categoryID
        self.channel = channel
        self.expiresAt = Date(timeIntervalSince1970: expiresAt.timeIntervalSince1970.rounded(.down))
    }

    private enum CodingKeys: String, CodingKey {
        case scope = "s", organisationID = "o", userID = "u", deliveryID = "d", digestItemID = "i", digestRunID = "r", notificationID = "n"
        case categoryID = "c", channel = "h", expiresAt = "e"
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        func uuid(_ key: CodingKeys) throws -> UUID? {
            guard let text = try container.decodeIfPresent(String.self, forKey: key) else { return nil }
            guard let bytes = linkTokenBase64URLDecode(Substring(text)), bytes.count == 16 else {
                throw DecodingError.dataCorruptedError(forKey: key, in: container, debugDescription: "Not a compact UUID")
            }
            return UUID(
                uuid: (
                    bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
                    bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15]
                ))
        }
        func required(_ key: CodingKeys) throws -> UUID {
            guard let value = try uuid(key) else {
                throw DecodingError.keyNotFound(key, .init(codingPath: container.codingPath, debugDescription: "Missing"))
            }
            return value
        }
        self.init(
            scope: try container.decode(LinkScope.self, forKey: .scope),
            organisationID: try required(.organisationID),
            userID: try required(.userID),
            deliveryID: try uuid(.deliveryID),
            digestItemID: try uuid(.digestItemID),
            digestRunID: try uuid(.digestRunID),
            notificationID: try uuid(.notificationID),
            categoryID: try uuid(.categoryID),
            channel: try container.decodeIfPresent(String.self, forKey: .channel),
            expiresAt: Date(timeIntervalSince1970: TimeInterval(try container.decode(Int64.self, forKey: .expiresAt)))
        )
    }

    /// The claims as `encode(to:)` writes them through a `JSONEncoder` with sorted keys, written
    /// by hand: the encoder was 3 % of the worker's CPU per email, which signs an unsubscribe link
    /// (issue 12). `LinkTokenTests` compares the two.
    var json: String {
        let compact = Self.compact
        var fields: [String] = []
        fields.reserveCapacity(10)
        if let categoryID { fields.append("\"c\":\"\(compact(categoryID))\"") }
        if let deliveryID { fields.append("\"d\":\"\(compact(deliveryID))\"") }
        fields.append("\"e\":\(Int64(expiresAt.timeIntervalSince1970.rounded(.down)))")
        if let channel { fields.append("\"h\":" + jsonQuoted(channel)) }
        if let digestItemID { fields.append("\"i\":\"\(compact(digestItemID))\"") }
        if let notificationID { fields.append("\"n\":\"\(compact(notificationID))\"") }
        fields.append("\"o\":\"\(compact(organisationID))\"")
        if let digestRunID { fields.append("\"r\":\"\(compact(digestRunID))\"") }
        fields.append("\"s\":" + jsonQuoted(scope.rawValue))
        fields.append("\"u\":\"\(compact(userID))\"")
        return "{" + fields.joined(separator: ",") + "}"
    }

    /// An id as its 16 bytes in base64url: 22 characters instead of 36.
    private static func compact(_ id: UUID) -> String { withUnsafeBytes(of: id.uuid) { base64URLEncodedString($0) } }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        let compact = Self.compact
        try container.encode(scope, forKey: .scope)
        try container.encode(compact(organisationID), forKey: .organisationID)
        try container.encode(compact(userID), forKey: .userID)
        try container.encodeIfPresent(deliveryID.map(compact), forKey: .deliveryID)
        try container.encodeIfPresent(digestItemID.map(compact), forKey: .digestItemID)
        try container.encodeIfPresent(digestRunID.map(compact), forKey: .digestRunID)
        try container.encodeIfPresent(notificationID.map(compact), forKey: .notificationID)
        try container.encodeIfPresent(categoryID.map(compact), forKey: .categoryID)
        try container.encodeIfPresent(channel, forKey: .channel)
        try container.encode(Int64(expiresAt.timeIntervalSince1970.rounded(.down)), forKey: .expiresAt)
    }
}

// MARK: - base64url (RFC 4648 §5, no padding): encoded by `base64URLEncodedString`, decoded strictly here.

/// Strict decoder: URL-safe alphabet only, no padding, and unused trailing bits must be zero — so every byte
/// string has exactly one accepted encoding and a token cannot be altered without changing its bytes.
private func linkTokenBase64URLDecode(_ text: Substring) -> [UInt8]? {
    guard let decoded = base64URLSextets(text.utf8, acceptingStandardAlphabet: false) else { return nil }
    // 6 leftover bits means a dangling character (length ≡ 1 mod 4); 2 or 4 must be zero padding bits.
    guard decoded.leftoverBits < 6, decoded.leftover == 0 else { return nil }
    return decoded.bytes
}

extension LinkKeyRing {
    /// A ring of one random key, for a process started without `HERALD_LINK_KEYS`: its links
    /// stop working when the process ends.
    public static func ephemeral() -> LinkKeyRing {
        let bytes = (0..<32).map { _ in UInt8.random(in: 0...255) }
        // A fixed, valid key id and a 32-byte secret cannot fail validation.
        return try! LinkKeyRing(keys: [try! LinkKey(id: "ephemeral", secret: bytes)])
    }
}
