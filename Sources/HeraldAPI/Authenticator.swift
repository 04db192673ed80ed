import Foundation
import HeraldCore
import HeraldStore
import Logging

/// A credential from the `Authorization` header whose form (and, for a JWT, signature and
/// expiry) has been checked; what it may do is read from the database by `principal(for:in:)`.
enum Credential: Sendable {
    case accessToken(VerifiedAccess)
    case apiKey(OpaqueToken)

    var organisationID: UUID {
        switch self {
        case .accessToken(let access): access.organisationID
        case .apiKey(let key): key.organisationID
        }
    }

    /// Whose grant the request's transaction reads as it enters.
    var admission: Admission {
        switch self {
        case .accessToken(let access): .user(access.userID)
        case .apiKey(let key): .apiKey(key.id)
        }
    }

    var actor: Actor {
        switch self {
        case .accessToken(let access): .user(access.userID)
        case .apiKey(let key): .apiKey(key.id)
        }
    }
}

/// Turns an `Authorization` header into a principal, in two steps: `credential(from:)` checks
/// the header without the database (every request, so a bad credential is a 401 anywhere), and
/// `principal(for:in:)` reads the grant inside the request's one tenant transaction. Grants are
/// read on each request, so a revoked role, a revoked key or a deactivated user stops working
/// at once rather than when a token expires.
struct Authenticator: Sendable {
    let tokens: AccessTokens
    let now: @Sendable () -> Date

    /// The credential, nil without an `Authorization` header, or 401 for a bad one.
    func credential(from authorization: String?, logger: Logger) async throws -> Credential? {
        guard let authorization else { return nil }
        let parts = authorization.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else {
            throw APIError.unauthorized("Use the Bearer scheme with an access token or an API key.")
        }
        // Spaces and tabs around the token trimmed, on its bytes (Foundation's trimming was 3 % of
        // a feed read's CPU).
        let bytes = parts[1].utf8
        let start = bytes.firstIndex { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\t") } ?? bytes.endIndex
        let end = bytes[start...].lastIndex { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\t") }.map(bytes.index(after:)) ?? start
        let text = String(parts[1][start..<end])
        if text.hasPrefix(OpaqueToken.Kind.apiKey.rawValue + ".") {
            guard let key = OpaqueToken(parsing: text, kind: .apiKey) else { throw APIError.unauthorized("The API key is not valid.") }
            return .apiKey(key)
        }
        do {
            return .accessToken(try tokens.verify(text, now: now()))
        } catch {
            logger.notice("access token refused", metadata: ["reason": "\(error)"])
            // Saying "expired" tells a client to refresh; any other reason stays unexplained.
            throw APIError.unauthorized(error == .expired ? "The access token has expired; refresh it." : "The access token is not valid.")
        }
    }

    /// What the credential may do, read in `tx` (the credential's organisation); 401 when the
    /// user is gone or inactive, or the key revoked, expired or wrong.
    func principal(for credential: Credential, in tx: TenantTransaction) async throws -> Principal {
        switch credential {
        case .accessToken(let access):
            guard let grant = try await tx.grant(forUser: access.userID) else {
                throw APIError.unauthorized("The access token is not valid.")
            }
            return Principal(organisationID: access.organisationID, actor: credential.actor, permissions: grant.permissions)
        case .apiKey(let key):
            guard let grant = try await tx.grant(forApiKey: key.id, secretHash: key.secretHash, now: now()) else {
                throw APIError.unauthorized("The API key is not valid.")
            }
            return Principal(organisationID: key.organisationID, actor: credential.actor, permissions: grant.permissions)
        }
    }
}
