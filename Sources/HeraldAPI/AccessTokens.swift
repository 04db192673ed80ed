import Crypto
import Foundation
import HeraldCore
import JWTKit
import Synchronization

/// The claims of a Herald access token.
struct AccessClaims: JWTPayload, Equatable {
    var iss: IssuerClaim
    var aud: AudienceClaim
    var sub: SubjectClaim
    var org: String
    var exp: ExpirationClaim
    var nbf: NotBeforeClaim
    var iat: IssuedAtClaim
    var jti: IDClaim
    /// The session: the refresh-token family the token was issued with (absent for tokens
    /// issued outside a login). A live stream opened with the token ends when it is revoked.
    var sid: String?

    /// Time claims are checked by `AccessTokens.verify` with an injected clock and leeway;
    /// nothing is left to jwt-kit's defaults.
    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// One configured signing key. Each key is tied to exactly one algorithm (RFC 8725 §3.1).
public struct AccessTokenKey: Sendable {
    public var id: String
    public var privateKey: ES256PrivateKey
    public static let algorithm = "ES256"

    public init(id: String, privateKey: ES256PrivateKey) {
        self.id = id
        self.privateKey = privateKey
    }

    /// Loads every `<kid>.pem` in `directory`.
    public static func load(directory: String) throws -> [AccessTokenKey] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return try files.filter { $0.hasSuffix(".pem") }.sorted().map { file in
            let pem = try String(contentsOfFile: (directory as NSString).appendingPathComponent(file), encoding: .utf8)
            return AccessTokenKey(id: String(file.dropLast(4)), privateKey: try ES256PrivateKey(pem: pem))
        }
    }
}

/// Why an access token was refused. The client only ever hears "not valid"; the reason is logged.
enum AccessTokenRejection: Error, Equatable {
    case malformed, algorithmNotAllowed(String), unknownKeyID, badSignature, expired, notYetValid, wrongIssuer, wrongAudience, badClaims
}

/// The verified content of an access token.
struct VerifiedAccess: Sendable, Equatable {
    var organisationID: UUID
    var userID: UUID
    var sessionID: UUID? = nil
}

/// Issues and verifies access JWTs following RFC 8725: the algorithm comes from the key, not
/// the token; a `kid` must name a configured key (jwt-kit would fall back to a default key);
/// `exp`, `nbf`, `iss` and `aud` are always checked, with a bounded leeway.
public struct AccessTokens: Sendable {
    /// Signs (jwt-kit). Verification does not go through it: `JWTKeyCollection` is an actor, so
    /// every token check of the process queued on it, two hops per request.
    let keys: JWTKeyCollection
    /// Each key's public half as swift-crypto holds it, by key id: verification is synchronous.
    let verifiers: [String: P256.Signing.PublicKey]
    let keyIDs: Set<String>
    /// Tokens already checked (`CheckedTokens`).
    let checkedTokens = CheckedTokens()
    /// Whether each token's session is still live (`SessionLiveness`).
    let sessions: SessionLiveness
    let activeKeyID: String
    let publicKeys: [(id: String, key: ES256PublicKey)]
    let issuer: String
    let audience: String
    let ttl: TimeInterval
    let leeway: TimeInterval

    public init(
        keys: [AccessTokenKey], activeKeyID: String?, issuer: String, audience: String, ttl: TimeInterval, leeway: TimeInterval,
        sessionCheckSeconds: TimeInterval = 30
    ) async throws {
        guard let last = keys.last else { throw AccessTokenConfigurationError.noKeys }
        let active = activeKeyID ?? last.id
        guard keys.contains(where: { $0.id == active }) else { throw AccessTokenConfigurationError.unknownActiveKey(active) }
        let collection = JWTKeyCollection()
        for key in keys {
            await collection.add(ecdsa: key.privateKey, kid: JWKIdentifier(string: key.id))
        }
        self.keys = collection
        var verifiers: [String: P256.Signing.PublicKey] = [:]
        for key in keys {
            verifiers[key.id] = try P256.Signing.PublicKey(pemRepresentation: key.privateKey.publicKey.pemRepresentation)
        }
        self.verifiers = verifiers
        self.keyIDs = Set(keys.map(\.id))
        self.activeKeyID = active
        self.publicKeys = keys.map { ($0.id, $0.privateKey.publicKey) }
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.leeway = min(leeway, 60)
        self.sessions = SessionLiveness(seconds: sessionCheckSeconds)
    }

    /// A signed access token for `userID` in `organisationID`.
    public func issueAccessToken(organisationID: UUID, userID: UUID, sessionID: UUID? = nil, now: Date) async throws -> String {
        // Whole seconds: NumericDate may be fractional, but not every verifier accepts that.
        let now = Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.down))
        let claims = AccessClaims(
            iss: .init(value: issuer), aud: .init(value: [audience]), sub: .init(value: userID.lowercased),
            org: organisationID.lowercased, exp: .init(value: now.addingTimeInterval(ttl)),
            nbf: .init(value: now), iat: .init(value: now), jti: .init(value: UUID().lowercased),
            sid: sessionID?.lowercased)
        return try await keys.sign(claims, kid: JWKIdentifier(string: activeKeyID))
    }

    /// The organisation and user of a valid token, or a rejection.
    func verify(_ token: String, now: Date) throws(AccessTokenRejection) -> VerifiedAccess {
        let checked: CheckedToken
        if let known = checkedTokens.lookup(token) {
            checked = known
        } else {
            checked = try check(token)
            checkedTokens.remember(token, checked)
        }
        // The time claims on every use, against the injected clock.
        guard now < checked.expires.addingTimeInterval(leeway) else { throw .expired }
        guard now >= checked.notBefore.addingTimeInterval(-leeway) else { throw .notYetValid }
        return checked.access
    }

    /// Everything about a token but the time: its form, algorithm, key, signature, issuer,
    /// audience and identifiers.
    private func check(_ token: String) throws(AccessTokenRejection) -> CheckedToken {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        // One spelling per token (RFC 7515 §2: base64url without padding, and no stray bits in
        // the last character): a trial's token was accepted with "=" added or its last character
        // changed. (An ECDSA signature's mirror (r, n − s) verifies too, as RFC 7518 allows:
        // tokens are told apart by their claims, never by their text.)
        guard parts.count == 3, parts.allSatisfy({ Data(base64URLEncoded: String($0))?.base64URLEncoded == String($0) }) else {
            throw .malformed
        }
        guard let headerData = Data(base64URLEncoded: String(parts[0])),
            let header = try? JSONDecoder().decode(Header.self, from: headerData)
        else { throw .malformed }
        guard header.alg == AccessTokenKey.algorithm else { throw .algorithmNotAllowed(header.alg) }
        guard let kid = header.kid, keyIDs.contains(kid), let verifier = verifiers[kid] else { throw .unknownKeyID }
        // ES256 (RFC 7518 §3.4): the signature is R and S, 32 bytes each, over the ASCII bytes of
        // the encoded header, a dot and the encoded payload.
        let signed = Data(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count))
        guard let signatureBytes = Data(base64URLEncoded: String(parts[2])),
            let signature = try? P256.Signing.ECDSASignature(rawRepresentation: signatureBytes),
            verifier.isValidSignature(signature, for: signed)
        else { throw .badSignature }
        guard let payload = Data(base64URLEncoded: String(parts[1])),
            let claims = try? Self.claimsDecoder.decode(AccessClaims.self, from: payload)
        else { throw .badClaims }
        guard claims.iss.value == issuer else { throw .wrongIssuer }
        guard claims.aud.value.contains(audience) else { throw .wrongAudience }
        guard let org = UUID(uuidString: claims.org), let user = UUID(uuidString: claims.sub.value) else { throw .badClaims }
        var session: UUID?
        if let sid = claims.sid {
            guard let parsed = UUID(uuidString: sid) else { throw .badClaims }
            session = parsed
        }
        return CheckedToken(
            access: VerifiedAccess(organisationID: org, userID: user, sessionID: session), expires: claims.exp.value,
            notBefore: claims.nbf.value)
    }

    /// The public half of every live key, as a JWKS document's entries.
    var jwks: [(kid: String, x: String, y: String)] {
        publicKeys.compactMap { entry in
            guard let parameters = entry.key.parameters else { return nil }
            return (entry.id, parameters.x, parameters.y)
        }
    }

    var accessTTL: Int { Int(ttl) }

    /// NumericDate claims are seconds since the epoch (RFC 7519 §2).
    private static let claimsDecoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        return decoder
    }()

    private struct Header: Decodable {
        var alg: String
        var kid: String?
    }
}

/// A token whose form, signature and claims were checked, and the times it is valid between.
struct CheckedToken: Sendable {
    var access: VerifiedAccess
    var expires: Date
    var notBefore: Date
}

/// Tokens already checked, by their text: a client sends the same token with every request for
/// its life (15 minutes), and the signature check was 7 % of a busy server's CPU under `wrk`.
/// Only a token that passed every check is kept, under its exact text (its signature included);
/// the time claims are checked on every use. At most `capacity` entries: when full, it starts
/// again empty.
final class CheckedTokens: Sendable {
    static let capacity = 10_000
    private let entries = Mutex<[String: CheckedToken]>([:])

    func lookup(_ token: String) -> CheckedToken? { entries.withLock { $0[token] } }

    func remember(_ token: String, _ checked: CheckedToken) {
        entries.withLock { entries in
            if entries.count >= Self.capacity { entries.removeAll(keepingCapacity: true) }
            entries[token] = checked
        }
    }
}

/// The JWT keys in the configuration cannot be used.
public enum AccessTokenConfigurationError: Error, CustomStringConvertible {
    case noKeys
    case unknownActiveKey(String)

    public var description: String {
        switch self {
        case .noKeys: "no JWT signing keys: put ES256 <kid>.pem files in HERALD_JWT_KEYS_DIR (herald jwt-keygen makes one)"
        case .unknownActiveKey(let kid): "HERALD_JWT_ACTIVE_KID=\(kid) names no key in HERALD_JWT_KEYS_DIR"
        }
    }
}
