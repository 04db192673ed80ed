import Foundation
import HeraldCore
import Logging
import PostgresNIO

/// Errors the store reports in the product's terms. The HTTP layer maps them to problems.
public enum StoreError: Error, Sendable, Equatable {
    /// No row with this id in the current organisation (another organisation's id looks the same).
    case notFound
    /// A unique key already holds this value (the constraint name says which).
    case conflict(constraint: String)
    /// A reference to a row that does not exist in the current organisation.
    case invalidReference(constraint: String)
    /// A CHECK constraint refused the value.
    case checkViolation(constraint: String)
}

/// Herald's PostgreSQL access. Every statement on a tenant table runs inside `withTenant`,
/// which sets the organisation (and the acting user) for that transaction only, so the
/// row-level security policies decide what the statement can see.
public struct Database: Sendable {
    let client: PostgresClient
    let logger: Logger

    public init(client: PostgresClient, logger: Logger) {
        self.client = client
        self.logger = logger
    }

    /// Runs `body` in one transaction with the tenant context set.
    ///
    /// `set_config(..., true)` scopes the settings to the transaction, so a pooled connection
    /// (or a transaction-mode pooler) never carries one organisation's context into another's.
    ///
    /// `recipient` confines in-app rows to one user as well (the feed endpoints set it), so a
    /// user's feed cannot show another user's rows even within one organisation.
    public func withTenant<Result: Sendable>(
        _ organisationID: UUID,
        actor: Actor = .system,
        requestID: String? = nil,
        recipient: UUID? = nil,
        _ body: (TenantTransaction) async throws -> Result
    ) async throws -> Result {
        do {
            return try await client.withTransaction(logger: logger) { connection in
                try await connection.query(
                    """
                    SELECT set_config('app.org_id', \(organisationID.uuidString), true),
                           set_config('app.user_id', \(actor.userID?.uuidString ?? ""), true),
                           set_config('app.recipient_id', \(recipient?.uuidString ?? ""), true)
                    """,
                    logger: logger
                )
                let tx = TenantTransaction(
                    connection: connection, organisationID: organisationID, actor: actor,
                    requestID: requestID, logger: logger)
                return try await body(tx)
            }
        } catch let error as PostgresTransactionError {
            throw Self.translate(error.closureError ?? error.beginError ?? error.commitError ?? error)
        } catch {
            throw Self.translate(error)
        }
    }

    /// The organisation with this slug, through the one function that may look across tenants.
    public func organisationID(slug: String) async throws -> UUID? {
        let rows = try await client.query("SELECT organisation_id_for_slug(\(slug))", logger: logger)
        for try await id in rows.decode(UUID?.self) { return id }
        return nil
    }

    /// A trivial round trip, for readiness.
    public func ping() async throws {
        _ = try await client.query("SELECT 1", logger: logger).collect()
    }

    /// Versions recorded in `schema_migrations`.
    public func appliedMigrationVersions() async throws -> [Int] {
        var versions: [Int] = []
        let rows = try await client.query("SELECT version FROM schema_migrations ORDER BY version", logger: logger)
        for try await version in rows.decode(Int.self) { versions.append(version) }
        return versions
    }

    /// Maps PostgreSQL's SQLSTATE codes to `StoreError`; anything else passes through.
    static func translate(_ error: any Error) -> any Error {
        guard let psql = error as? PSQLError, let state = psql.serverInfo?[.sqlState] else { return error }
        let constraint = psql.serverInfo?[.constraintName] ?? ""
        switch state {
        case "23505": return StoreError.conflict(constraint: constraint)
        case "23503": return StoreError.invalidReference(constraint: constraint)
        case "23514": return StoreError.checkViolation(constraint: constraint)
        default: return error
        }
    }
}

/// One transaction with the tenant context set. Only the store can reach its connection.
public struct TenantTransaction: Sendable {
    let connection: PostgresConnection
    /// The organisation every statement in this transaction is confined to.
    public let organisationID: UUID
    /// Who is acting, for the audit log.
    public let actor: Actor
    /// The request that caused this transaction, for the audit log.
    public let requestID: String?
    let logger: Logger

    /// Runs one statement. Constraint violations surface here as `StoreError`, so a caller
    /// can react to them inside the transaction (which PostgreSQL then aborts).
    @discardableResult
    func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        do {
            return try await connection.query(query, logger: logger).collect()
        } catch {
            throw Database.translate(error)
        }
    }
}
