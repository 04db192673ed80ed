import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listApiKeys(_ input: Operations.ListApiKeys.Input) async throws -> Operations.ListApiKeys.Output {
        let (keys, org) = try await tenant { tx, principal in (try await tx.apiKeys(), principal.organisationID) }
        return .ok(.init(body: .json(.init(items: keys.map { .init($0, organisationID: org) }))))
    }

    func getApiKey(_ input: Operations.GetApiKey.Input) async throws -> Operations.GetApiKey.Output {
        let id = try id(input.path.keyId, "API key")
        let key = try await tenant { tx, principal in
            Components.Schemas.ApiKey(try await tx.apiKey(id), organisationID: principal.organisationID)
        }
        return .ok(.init(body: .json(key)))
    }

    /// The secret is in this answer only; the database keeps its SHA-256.
    func createApiKey(_ input: Operations.CreateApiKey.Input) async throws -> Operations.CreateApiKey.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let (name, roleID) = (try Validate.text(body.name, field: "name"), try Validate.uuid(body.roleId, field: "role_id"))
        if let expires = body.expiresAt, expires <= now() {
            throw APIError.unprocessable(ValidationError(field: "expires_at", message: "must be in the future."))
        }
        let created = try await tenant { tx, principal in
            let role = try await tx.role(roleID, referencedBy: "role_id")
            try requireHolds(role.permissions, principal)
            let token = OpaqueToken(kind: .apiKey, organisationID: principal.organisationID)
            let key = Components.Schemas.ApiKey(
                try await tx.createApiKey(
                    id: token.id, name: name, roleID: role.id, secretHash: token.secretHash, expiresAt: body.expiresAt),
                organisationID: principal.organisationID)
            try await tx.audit(action: "apikey.create", targetType: "api_key", targetID: key.id, before: nil, after: try auditValue(key))
            return Components.Schemas.ApiKeyCreated(
                id: key.id, name: key.name, roleId: key.roleId, prefix: key.prefix, createdAt: key.createdAt,
                lastUsedAt: key.lastUsedAt, expiresAt: key.expiresAt, revokedAt: key.revokedAt, secret: token.text)
        }
        return .created(.init(body: .json(created)))
    }

    func revokeApiKey(_ input: Operations.RevokeApiKey.Input) async throws -> Operations.RevokeApiKey.Output {
        let id = try id(input.path.keyId, "API key")
        try await tenant { tx, principal in
            let key = try await tx.apiKey(id)
            // Acting on a key is acting on what its role holds, as making one is: a junior admin
            // with apikeys.manage cannot cut off the integration a stronger role's key serves.
            try requireHolds(try await tx.role(key.roleID).permissions, principal)
            let before = Components.Schemas.ApiKey(key, organisationID: principal.organisationID)
            guard before.revokedAt == nil else { return }
            let after = Components.Schemas.ApiKey(try await tx.revokeApiKey(id), organisationID: principal.organisationID)
            try await tx.audit(
                action: "apikey.revoke", targetType: "api_key", targetID: after.id, before: try auditValue(before),
                after: try auditValue(after))
        }
        return .noContent(.init())
    }
}
