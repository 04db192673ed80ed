import Foundation
import HeraldCore
import HeraldStore
import Logging
import OpenAPIRuntime

extension HeraldService {
    func getHealth(_ input: Operations.GetHealth.Input) async throws -> Operations.GetHealth.Output {
        .ok(.init(body: .json(.init(status: .ok))))
    }

    /// Ready when the database answers and every migration this build ships is applied.
    func getReadiness(_ input: Operations.GetReadiness.Input) async throws -> Operations.GetReadiness.Output {
        let applied: [Int]
        do {
            applied = try await database.appliedMigrationVersions()
        } catch {
            try RequestScope.get().logger.error("readiness: database check failed", metadata: ["error": "\(String(reflecting: error))"])
            throw APIError.notReady("The database is not reachable.")
        }
        let pending = Set(expectedMigrations).subtracting(applied)
        guard pending.isEmpty else {
            throw APIError.notReady(
                "Migrations pending: \(expectedMigrations.count - pending.count) of \(expectedMigrations.count) applied; run `herald migrate`."
            )
        }
        return .ok(
            .init(
                body: .json(
                    .init(
                        status: .ready, database: .ok,
                        migrations: .init(applied: applied.count, expected: expectedMigrations.count)))))
    }

    func getMetrics(_ input: Operations.GetMetrics.Input) async throws -> Operations.GetMetrics.Output {
        .ok(.init(body: .plainText(HTTPBody(metrics.render()))))
    }

    func getJWKS(_ input: Operations.GetJWKS.Input) async throws -> Operations.GetJWKS.Output {
        let keys = tokens.jwks.map { key in
            Components.Schemas.Jwk(kty: "EC", crv: "P-256", kid: key.kid, alg: AccessTokenKey.algorithm, use: "sig", x: key.x, y: key.y)
        }
        return .ok(.init(body: .json(.init(keys: keys))))
    }

    func getMe(_ input: Operations.GetMe.Input) async throws -> Operations.GetMe.Output {
        let principal = try RequestScope.get().requirePrincipal()
        let kind: Components.Schemas.Principal.KindPayload = if case .apiKey = principal.actor { .apiKey } else { .user }
        var apiKeyID: String?
        if case .apiKey(let id) = principal.actor { apiKeyID = id.lowercased }
        return .ok(
            .init(
                body: .json(
                    .init(
                        organisationId: principal.organisationID.lowercased, kind: kind, userId: principal.actor.userID?.lowercased,
                        apiKeyId: apiKeyID, permissions: principal.permissions.sorted().map(\.rawValue)))))
    }

    func listPermissions(_ input: Operations.ListPermissions.Input) async throws -> Operations.ListPermissions.Output {
        .ok(.init(body: .json(.init(items: Permission.allCases.map { .init(key: $0.rawValue, description: $0.summary) }))))
    }
}
