import Foundation
import HeraldCore
import HeraldStore
import Logging

/// Turns an `Authorization` header into a principal: an access JWT for a user, or an API key
/// (`hk.…`). Permissions are read from the database on each request, so a revoked role, a
/// revoked key or a deactivated user stops working at once rather than when a token expires.
struct Authenticator: Sendable {
    let database: Database
    let tokens: AccessTokens
    let now: @Sendable () -> Date

    /// The principal, nil without an `Authorization` header, or 401 for a bad credential.
    func authenticate(authorization: String?, logger: Logger) async throws -> Principal? {
        guard let authorization else { return nil }
        let parts = authorization.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else {
            throw APIError.unauthorized("Use the Bearer scheme with an access token or an API key.")
        }
        let credential = String(parts[1]).trimmingCharacters(in: .whitespaces)
        if credential.hasPrefix(OpaqueToken.Kind.apiKey.rawValue + ".") {
            return try await apiKeyPrincipal(credential)
        }
        return try await userPrincipal(credential, logger: logger)
    }

    private func userPrincipal(_ token: String, logger: Logger) async throws -> Principal {
        let access: VerifiedAccess
        do {
            access = try await tokens.verify(token, now: now())
        } catch {
            logger.notice("access token refused", metadata: ["reason": "\(error)"])
            // Saying "expired" tells a client to refresh; any other reason stays unexplained.
            throw APIError.unauthorized(error == .expired ? "The access token has expired; refresh it." : "The access token is not valid.")
        }
        let grant = try await database.withTenant(access.organisationID, actor: .user(access.userID)) { tx in
            try await tx.grant(forUser: access.userID)
        }
        guard let grant else { throw APIError.unauthorized("The access token is not valid.") }
        return Principal(organisationID: access.organisationID, actor: .user(access.userID), permissions: grant.permissions)
    }

    private func apiKeyPrincipal(_ text: String) async throws -> Principal {
        guard let key = OpaqueToken(parsing: text, kind: .apiKey) else {
            throw APIError.unauthorized("The API key is not valid.")
        }
        let grant = try await database.withTenant(key.organisationID, actor: .apiKey(key.id)) { tx in
            try await tx.grant(forApiKey: key.id, secretHash: key.secretHash, now: now())
        }
        guard let grant else { throw APIError.unauthorized("The API key is not valid.") }
        return Principal(organisationID: key.organisationID, actor: .apiKey(key.id), permissions: grant.permissions)
    }
}
