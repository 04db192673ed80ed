import Foundation
import HeraldCore
import PostgresNIO

/// An integrator's credential. The secret is never stored, only its hash.
public struct ApiKey: Sendable, Equatable {
    public var id: UUID
    public var name: String
    public var roleID: UUID
    public var createdAt: Date
    public var lastUsedAt: Date?
    public var expiresAt: Date?
    public var revokedAt: Date?
}

/// A refresh token as stored: only the hash of its secret.
public struct StoredRefreshToken: Sendable {
    public var id: UUID
    public var familyID: UUID
    public var userID: UUID
    public var secretHash: Data
    public var expiresAt: Date
    public var usedAt: Date?
    public var revokedAt: Date?
}

/// What an API key or a user may do: their permissions, if the credential is live.
public struct Grant: Sendable, Equatable {
    public var permissions: Set<Permission>
    public init(permissions: Set<Permission>) { self.permissions = permissions }
}

/// A row of `user_grant` / `enter_tenant_as_user` (migration 0017).
struct UserGrantRow: Sendable {
    static let columns = "active, permissions, last_engaged_at, warned"
    var active: Bool
    var permissions: [String]
    var lastEngagedAt: Date
    var warned: Bool

    init(_ row: PostgresRow) throws {
        (active, permissions, lastEngagedAt, warned) = try row.decode((Bool, [String], Date, Bool).self, table: "users")
    }

    /// The grant: nil when the user is deactivated.
    var grant: Grant? { active ? Grant(permissions: Set(permissions.compactMap(Permission.init(rawValue:)))) : nil }
}

/// A row of `api_key_grant` / `enter_tenant_as_api_key` (migration 0017).
struct ApiKeyGrantRow: Sendable {
    static let columns = "secret_hash, expires_at, revoked_at, permissions, last_used_at"
    var secretHash: Data
    var expiresAt: Date?
    var revokedAt: Date?
    var permissions: [String]
    /// When the key was last marked used (at most once a minute: `grant(forApiKey:)`).
    var lastUsedAt: Date?

    init(_ row: PostgresRow) throws {
        (secretHash, expiresAt, revokedAt, permissions, lastUsedAt) = try row.decode(
            (Data, Date?, Date?, [String], Date?).self, table: "api_keys")
    }
}

/// Whose grant a tenant transaction reads as it enters (`Database.withTenant(admitting:)`).
public enum Admission: Sendable, Equatable {
    case user(UUID)
    case apiKey(UUID)
}

/// What the entry of a tenant transaction read: nothing, or the admitted caller's grant row
/// (nil when no such user or key exists in the organisation). A snapshot of the transaction's
/// start: the boundary's permission check and the feed's engagement write read it; a handler
/// that changes the caller's roles and then needs their grant must not (none does).
enum Entry: Sendable {
    case none
    case user(UUID, UserGrantRow?)
    case apiKey(UUID, ApiKeyGrantRow?)
}

extension TenantTransaction {
    // MARK: Principals

    /// The statement that sets the tenant context for the rest of the transaction (`SET LOCAL`,
    /// inside the functions of migration 0017) and reads the admitted caller's grant, in one
    /// round trip; `entry(admitting:from:)` reads its answer. `Database.withTenant` sends it
    /// together with BEGIN. The ids travel as bind parameters typed `uuid`, so no text from a
    /// request reaches SQL.
    func entryStatement(recipient: UUID?, admitting admission: Admission?) -> PostgresQuery {
        switch admission {
        case nil: "SELECT enter_tenant(\(organisationID), \(recipient))"
        case .user(let id):
            "SELECT \(unescaped: UserGrantRow.columns) FROM enter_tenant_as_user(\(organisationID), \(recipient), \(id))"
        case .apiKey(let id): "SELECT \(unescaped: ApiKeyGrantRow.columns) FROM enter_tenant_with_api_key(\(organisationID), \(id))"
        }
    }

    /// What `entryStatement` read.
    func entry(admitting admission: Admission?, from rows: [PostgresRow]) throws -> Entry {
        switch admission {
        case nil: .none
        case .user(let id): .user(id, try rows.first.map(UserGrantRow.init))
        case .apiKey(let id): .apiKey(id, try rows.first.map(ApiKeyGrantRow.init))
        }
    }

    /// The permissions of an active user, or nil when the user is missing or deactivated.
    public func grant(forUser id: UUID) async throws -> Grant? {
        if case .user(id, let row) = entry { return row?.grant }
        let rows = try await query("SELECT \(unescaped: UserGrantRow.columns) FROM user_grant(\(organisationID), \(id))")
        return try rows.first.map(UserGrantRow.init)?.grant
    }

    /// Every permission the user's roles carry, active or not.
    public func permissions(ofUser id: UUID) async throws -> Set<Permission> {
        let rows = try await query(
            """
            SELECT coalesce(array_agg(DISTINCT p.permission), '{}') FROM user_roles ur
            JOIN role_permissions p ON p.organisation_id = ur.organisation_id AND p.role_id = ur.role_id
            WHERE ur.organisation_id = \(organisationID) AND ur.user_id = \(id)
            """)
        return Set(try rows[0].decode([String].self).compactMap(Permission.init(rawValue:)))
    }

    /// The permissions of a live API key whose secret hashes to `secretHash`, or nil.
    /// Marks the key used, at most once a minute (to keep reads cheap), and never waits for
    /// another request marking it: the row lock would be held to the end of that request's
    /// transaction, and every request of the key would queue behind it (issue 12).
    public func grant(forApiKey id: UUID, secretHash: Data, now: Date) async throws -> Grant? {
        let key: ApiKeyGrantRow?
        if case .apiKey(id, let entered) = entry {
            key = entered
        } else {
            let rows = try await query("SELECT \(unescaped: ApiKeyGrantRow.columns) FROM api_key_grant_with_use(\(organisationID), \(id))")
            key = try rows.first.map(ApiKeyGrantRow.init)
        }
        guard let key, constantTimeEqual(key.secretHash, secretHash), key.revokedAt == nil, key.expiresAt.map({ $0 > now }) ?? true
        else { return nil }
        let grant = Grant(permissions: Set(key.permissions.compactMap(Permission.init(rawValue:))))
        // A key marked less than a minute ago (as the entry read it, migration 0042) is not marked
        // again: the statement would change nothing, and it was one of every request's.
        if let last = key.lastUsedAt, now.timeIntervalSince(last) < 60 { return grant }
        try await query(
            """
            UPDATE api_keys SET last_used_at = \(now)
            WHERE organisation_id = \(organisationID) AND id = (
                SELECT id FROM api_keys
                WHERE organisation_id = \(organisationID) AND id = \(id) AND (last_used_at IS NULL OR last_used_at < \(now) - interval '1 minute')
                FOR NO KEY UPDATE SKIP LOCKED)
            """)
        return grant
    }

    // MARK: API keys

    /// Every API key of the organisation, newest first.
    public func apiKeys() async throws -> [ApiKey] {
        let rows = try await query(
            "SELECT \(unescaped: apiKeyColumns) FROM api_keys WHERE organisation_id = \(organisationID) ORDER BY created_at DESC, id")
        return try rows.map(decodeApiKey)
    }

    /// The API key with this id.
    public func apiKey(_ id: UUID) async throws -> ApiKey {
        let rows = try await query(
            "SELECT \(unescaped: apiKeyColumns) FROM api_keys WHERE organisation_id = \(organisationID) AND id = \(id)")
        guard let row = rows.first else { throw StoreError.notFound("API key") }
        return try decodeApiKey(row)
    }

    /// Stores a new API key with the hash of its secret.
    public func createApiKey(id: UUID, name: String, roleID: UUID, secretHash: Data, expiresAt: Date?) async throws -> ApiKey {
        try await query(
            """
            INSERT INTO api_keys (organisation_id, id, name, role_id, secret_hash, created_by_user_id, expires_at)
            VALUES (\(organisationID), \(id), \(name), \(roleID), \(secretHash), \(actor.userID), \(expiresAt))
            """)
        return try await apiKey(id)
    }

    /// Revokes an API key (idempotent).
    public func revokeApiKey(_ id: UUID) async throws -> ApiKey {
        let rows = try await query(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id"
        )
        guard !rows.isEmpty else { throw StoreError.notFound("API key") }
        return try await apiKey(id)
    }

    // MARK: Refresh tokens

    /// Stores a refresh token (the first of a family at login, or a successor at refresh).
    public func insertRefreshToken(id: UUID, familyID: UUID, userID: UUID, secretHash: Data, expiresAt: Date) async throws {
        try await query(
            """
            INSERT INTO refresh_tokens (organisation_id, id, family_id, user_id, secret_hash, expires_at)
            VALUES (\(organisationID), \(id), \(familyID), \(userID), \(secretHash), \(expiresAt))
            """)
    }

    /// The user a refresh token belongs to (read without a lock: the caller locks the user, then
    /// the token, in the order a change of password or a deactivation takes them).
    public func refreshTokenUser(_ id: UUID) async throws -> UUID? {
        try await query("SELECT user_id FROM refresh_tokens WHERE organisation_id = \(organisationID) AND id = \(id)").first?
            .decode(UUID.self)
    }

    /// The user's state and password hash, the row held (`FOR SHARE`) to the end of the
    /// transaction: a change of password, a reset or a deactivation, which update the row and
    /// then revoke the user's refresh tokens, waits for this transaction, or this one for it, so
    /// a session this transaction starts is either revoked with the others or never started.
    public func holdUserCredentials(_ id: UUID) async throws -> (active: Bool, passwordHash: String?)? {
        try await query(
            "SELECT active, password_hash FROM users WHERE organisation_id = \(organisationID) AND id = \(id) FOR SHARE"
        ).first?.decode((Bool, String?).self)
    }

    /// The refresh token with this id, locked for the rest of the transaction so that two
    /// concurrent refreshes with the same token cannot both succeed.
    public func lockRefreshToken(_ id: UUID) async throws -> StoredRefreshToken? {
        let rows = try await query(
            """
            SELECT id, family_id, user_id, secret_hash, expires_at, used_at, revoked_at
            FROM refresh_tokens WHERE organisation_id = \(organisationID) AND id = \(id) FOR UPDATE
            """)
        guard let row = rows.first else { return nil }
        let (id, family, user, hash, expires, used, revoked) = try row.decode((UUID, UUID, UUID, Data, Date, Date?, Date?).self)
        return StoredRefreshToken(
            id: id, familyID: family, userID: user, secretHash: hash, expiresAt: expires, usedAt: used, revokedAt: revoked)
    }

    /// Marks a refresh token used.
    public func markRefreshTokenUsed(_ id: UUID, at now: Date) async throws {
        try await query("UPDATE refresh_tokens SET used_at = \(now) WHERE organisation_id = \(organisationID) AND id = \(id)")
    }

    /// Revokes every token of a family; returns how many were still live.
    @discardableResult
    public func revokeRefreshFamily(_ familyID: UUID, at now: Date) async throws -> Int {
        let rows = try await query(
            "UPDATE refresh_tokens SET revoked_at = \(now) WHERE organisation_id = \(organisationID) AND family_id = \(familyID) AND revoked_at IS NULL RETURNING id"
        )
        return rows.count
    }

    /// Revokes every live refresh token of `userID` but those of the session `keeping` (a change
    /// of password ends the user's other sessions); returns the families it ended.
    public func revokeRefreshTokens(ofUser userID: UUID, keeping: UUID?, at now: Date) async throws -> Set<UUID> {
        let rows = try await query(
            """
            UPDATE refresh_tokens SET revoked_at = \(now)
            WHERE organisation_id = \(organisationID) AND user_id = \(userID) AND revoked_at IS NULL
              AND family_id IS DISTINCT FROM \(keeping)
            RETURNING family_id
            """)
        return Set(try rows.map { try $0.decode(UUID.self) })
    }
}

/// Compares two hashes without an early exit, so timing says nothing about where they differ.
public func constantTimeEqual(_ a: Data, _ b: Data) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for (x, y) in zip(a, b) { difference |= x ^ y }
    return difference == 0
}

extension TenantTransaction {
    /// Deletes the revoked API keys of a role (the role is being deleted), returning them.
    func deleteRevokedApiKeys(ofRole id: UUID) async throws -> [ApiKey] {
        try await query(
            """
            DELETE FROM api_keys WHERE organisation_id = \(organisationID) AND role_id = \(id) AND revoked_at IS NOT NULL
            RETURNING \(unescaped: apiKeyColumns)
            """
        ).map(decodeApiKey)
    }
}

private let apiKeyColumns = "id, name, role_id, created_at, last_used_at, expires_at, revoked_at"

private func decodeApiKey(_ row: PostgresRow) throws -> ApiKey {
    let (id, name, role, created, used, expires, revoked) = try row.decode((UUID, String, UUID, Date, Date?, Date?, Date?).self)
    return ApiKey(id: id, name: name, roleID: role, createdAt: created, lastUsedAt: used, expiresAt: expires, revokedAt: revoked)
}
