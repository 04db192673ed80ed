import Foundation
import HeraldCore
import PostgresNIO

/// A named set of permissions.
public struct Role: Sendable, Equatable {
    public var id: UUID
    public var key: String
    public var name: String
    public var description: String
    public var builtin: Bool
    public var permissions: Set<Permission>
    public var createdAt: Date
    public var updatedAt: Date
}

extension TenantTransaction {
    /// Every role of the organisation, built-in first.
    public func roles() async throws -> [Role] {
        let rows = try await query(
            "SELECT \(unescaped: roleColumns) FROM roles r WHERE r.organisation_id = \(organisationID) ORDER BY r.builtin DESC, r.key")
        return try rows.map(decodeRole)
    }

    /// The role with this id. `field` names the request field that referred to it, when the
    /// role is not the operation's target (a missing one is then that field's fault, a 422).
    /// `locking`: the row stays locked (`FOR UPDATE`) to the transaction's end (a deletion).
    public func role(_ id: UUID, referencedBy field: String? = nil, locking: Bool = false) async throws -> Role {
        let rows = try await query(
            """
            SELECT \(unescaped: roleColumns) FROM roles r WHERE r.organisation_id = \(organisationID) AND r.id = \(id)
            \(unescaped: locking ? "FOR UPDATE OF r" : "")
            """)
        guard let row = rows.first else {
            throw field.map { StoreError.unknownReference(field: $0, resource: "role") } ?? StoreError.notFound("role")
        }
        return try decodeRole(row)
    }

    /// The roles with these ids, which the request field `field` names; a missing one is that
    /// field's fault (422).
    public func roles(_ ids: [UUID], referencedBy field: String) async throws -> [Role] {
        let rows = try await query(
            "SELECT \(unescaped: roleColumns) FROM roles r WHERE r.organisation_id = \(organisationID) AND r.id = ANY(\(ids)::uuid[])")
        let roles = try rows.map(decodeRole)
        guard Set(roles.map(\.id)) == Set(ids) else { throw StoreError.unknownReference(field: field, resource: "role") }
        return roles
    }

    /// The built-in role with this key.
    public func builtinRole(_ role: BuiltinRole) async throws -> Role {
        let rows = try await query(
            "SELECT \(unescaped: roleColumns) FROM roles r WHERE r.organisation_id = \(organisationID) AND r.key = \(role.rawValue) AND r.builtin"
        )
        guard let row = rows.first else { throw StoreError.notFound("role") }
        return try decodeRole(row)
    }

    /// Creates a custom role.
    public func createRole(key: String, name: String, description: String, permissions: Set<Permission>) async throws -> Role {
        let rows = try await query(
            """
            INSERT INTO roles (organisation_id, key, name, description)
            VALUES (\(organisationID), \(key), \(name), \(description))
            RETURNING id
            """)
        let id = try rows[0].decode(UUID.self)
        try await setRolePermissions(id, permissions)
        return try await role(id)
    }

    /// Changes a custom role's name, description or permissions (nil leaves a field as it is).
    public func updateRole(_ id: UUID, name: String?, description: String?, permissions: Set<Permission>?) async throws -> Role {
        let rows = try await query(
            """
            UPDATE roles SET name = coalesce(\(name), name), description = coalesce(\(description), description), updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) AND NOT builtin
            RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("role") }
        if let permissions { try await setRolePermissions(id, permissions) }
        return try await role(id)
    }

    /// Deletes a custom role; users holding it lose it. An API key holds exactly one role, so a
    /// live key blocks the deletion (`invalidReference`); revoked keys of the role go with it,
    /// and are returned (to be audited).
    @discardableResult
    public func deleteRole(_ id: UUID) async throws -> [ApiKey] {
        // Locked: a schedule being saved with this role in its audience holds it (`lockAudienceNames`).
        let role = try await role(id, locking: true)
        if !role.builtin { try await refuseIfSchedulesSend(to: "roleKeys", key: role.key, what: "role") }
        let removed = try await deleteRevokedApiKeys(ofRole: id)
        let rows = try await query(
            "DELETE FROM roles WHERE organisation_id = \(organisationID) AND id = \(id) AND NOT builtin RETURNING id")
        guard !rows.isEmpty else { throw StoreError.notFound("role") }
        return removed
    }

    /// Replaces a role's permissions.
    func setRolePermissions(_ id: UUID, _ permissions: Set<Permission>) async throws {
        let keys = permissions.sorted()
        try await query(
            "DELETE FROM role_permissions WHERE organisation_id = \(organisationID) AND role_id = \(id) AND permission <> ALL(\(keys)::text[])"
        )
        try await query(
            """
            INSERT INTO role_permissions (organisation_id, role_id, permission)
            SELECT \(organisationID), \(id), p FROM unnest(\(keys)::text[]) AS p
            ON CONFLICT DO NOTHING
            """)
    }
}

private let roleColumns = """
    r.id, r.key, r.name, r.description, r.builtin,
    coalesce((SELECT array_agg(p.permission ORDER BY p.permission) FROM role_permissions p
              WHERE p.organisation_id = r.organisation_id AND p.role_id = r.id), '{}'),
    r.created_at, r.updated_at
    """

private func decodeRole(_ row: PostgresRow) throws -> Role {
    let (id, key, name, description, builtin, permissions, created, updated) =
        try row.decode((UUID, String, String, String, Bool, [String], Date, Date).self)
    return Role(
        id: id, key: key, name: name, description: description, builtin: builtin,
        permissions: Set(permissions.compactMap(Permission.init(rawValue:))), createdAt: created, updatedAt: updated)
}

extension TenantTransaction {
    /// Active users holding the built-in owner role.
    /// Counted under a lock held to the commit, after the caller's change: two owners removing
    /// each other at once are counted one after the other, and the second sees the first's change
    /// (a review: both saw the other still there, and the organisation was left with none).
    public func activeOwnerCount() async throws -> Int {
        try await query("SELECT pg_advisory_xact_lock(hashtextextended('herald.owners:' || \(organisationID.lowercased), 0))")
        let rows = try await query(
            """
            SELECT count(*) FROM users u
            JOIN user_roles ur ON ur.organisation_id = u.organisation_id AND ur.user_id = u.id
            JOIN roles r ON r.organisation_id = ur.organisation_id AND r.id = ur.role_id
            WHERE u.organisation_id = \(organisationID) AND r.builtin AND r.key = \(BuiltinRole.owner.rawValue) AND u.active
            """)
        return try rows[0].decode(Int.self)
    }
}
