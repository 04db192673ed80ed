import Foundation
import HeraldCore
import HeraldStore
import Logging
import NIOCore
import OpenAPIRuntime

extension HeraldService {
    func getHealth(_ input: Operations.GetHealth.Input) async throws -> Operations.GetHealth.Output {
        .ok(.init(body: .json(.init(status: .ok))))
    }

    /// How long readiness waits for the database before it tries a connection of its own: a
    /// pool that cannot connect only times out (after the API's 10 s wait for a connection), and a probe must
    /// get an answer in its own time (Kubernetes waits 1 s by default).
    static let readinessDeadline: Duration = .seconds(2)

    /// Ready when the database answers and every migration this build ships is applied. When the
    /// pool has not answered within `readinessDeadline`, a connection is tried on its own: if
    /// PostgreSQL refuses it or nothing answers, readiness is 503 at once and the log says why, in
    /// PostgreSQL's or the socket's words; if it connects (the pool is only busy), readiness waits
    /// for the pool's answer, so a loaded instance does not leave its load balancer.
    func getReadiness(_ input: Operations.GetReadiness.Input) async throws -> Operations.GetReadiness.Output {
        let applied: [Int]
        do {
            applied = try await withThrowingTaskGroup(of: [Int]?.self) { group in
                group.addTask { try await database.appliedMigrationVersions() }
                group.addTask {
                    try await Task.sleep(for: Self.readinessDeadline)
                    let quiet = Logger(label: "herald.readiness", factory: { _ in SwiftLogNoOpLogHandler() })
                    // Full (too many connections) is busy, not down: wait for the pool's answer
                    // like the instances beside this one, rather than all leaving at once.
                    if let error = await databaseURL?.probe(timeout: .seconds(2), logger: quiet), !DatabaseWords.isBusy(error) {
                        throw DatabaseRefused(reason: DatabaseWords.of(error))
                    }
                    try await Task.sleep(for: .seconds(24 * 3600)) // the pool's call ends first, at its deadline
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let applied = first else { throw CancellationError() }
                return applied
            }
        } catch {
            let reason =
                (error as? DatabaseRefused)?.reason
                ?? "the pool's call failed (a connection of readiness's own was refused as busy, or not tried)"
            // A warning: a probe every few seconds during an outage; each request that failed
            // for it logs its own 503.
            try RequestScope.get().logger.warning(
                "readiness: the database is not reachable", metadata: ["error": "\(String(reflecting: error))", "reason": "\(reason)"])
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

    /// A connection of readiness's own failed: PostgreSQL's or the socket's words.
    struct DatabaseRefused: Error {
        var reason: String
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
        var profile: Components.Schemas.Profile?
        if let user = principal.actor.userID {
            profile = try await tenant { tx, _ in try await self.profile(of: user, tx) }
        }
        return .ok(.init(body: .json(me(principal, profile: profile))))
    }

    /// Who the credential acts as (`GET /v1/me`), with the user's profile when a user acts.
    func me(_ principal: Principal, profile: Components.Schemas.Profile?) -> Components.Schemas.Principal {
        let kind: Components.Schemas.Principal.KindPayload = if case .apiKey = principal.actor { .apiKey } else { .user }
        var apiKeyID: String?
        if case .apiKey(let id) = principal.actor { apiKeyID = id.lowercased }
        return .init(
            organisationId: principal.organisationID.lowercased, kind: kind, userId: principal.actor.userID?.lowercased,
            apiKeyId: apiKeyID, permissions: principal.permissions.sorted().map(\.rawValue), profile: profile)
    }

    /// A user's own settings and, beside them, what applies (the organisation's where theirs are unset).
    func profile(of user: UUID, _ tx: TenantTransaction) async throws -> Components.Schemas.Profile {
        let (record, organisation) = (try await tx.user(user), try await tx.organisation())
        return .init(
            email: record.email, displayName: record.displayName, locale: record.locale, timezone: record.timezone,
            digestHour: record.digestHour, digestWeekday: record.digestWeekday,
            quietHours: record.quietHours.map(Components.Schemas.QuietHours.init),
            effective: .init(
                locale: record.locale ?? organisation.defaultLocale, timezone: record.timezone ?? organisation.defaultTimezone,
                digestHour: record.digestHour ?? organisation.digestHour, digestWeekday: record.digestWeekday ?? organisation.digestWeekday)
        )
    }

    func listPermissions(_ input: Operations.ListPermissions.Input) async throws -> Operations.ListPermissions.Output {
        .ok(.init(body: .json(.init(items: Permission.allCases.map { .init(key: $0.rawValue, description: $0.summary) }))))
    }
}
