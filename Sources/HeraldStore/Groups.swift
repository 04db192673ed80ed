import Foundation
import HeraldCore
import PostgresNIO

/// A named set of users, e.g. the participants of one internship.
public struct Group: Sendable, Equatable {
    public var id: UUID
    public var key: String
    public var name: String
    public var description: String
    public var memberCount: Int
    public var createdAt: Date
    public var updatedAt: Date
}

extension TenantTransaction {
    /// The group with this id.
    /// `locking`: the row stays locked (`FOR UPDATE`) to the transaction's end (a deletion).
    public func group(_ id: UUID, locking: Bool = false) async throws -> Group {
        let rows = try await query(
            """
            SELECT \(unescaped: groupColumns) FROM groups g WHERE g.organisation_id = \(organisationID) AND g.id = \(id)
            \(unescaped: locking ? "FOR UPDATE OF g" : "")
            """)
        guard let row = rows.first else { throw StoreError.notFound("group") }
        return try decodeGroup(row)
    }

    /// Groups in creation order after `cursor`.
    public func groups(limit: Int, after cursor: PageCursor?) async throws -> Page<Group> {
        let rows = try await query(
            """
            SELECT \(unescaped: groupColumns) FROM groups g
            WHERE g.organisation_id = \(organisationID)
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (g.created_at, g.id) > ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY g.created_at, g.id
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeGroup), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Creates a group.
    public func createGroup(key: String, name: String, description: String) async throws -> Group {
        let rows = try await query(
            """
            INSERT INTO groups (organisation_id, key, name, description)
            VALUES (\(organisationID), \(key), \(name), \(description))
            RETURNING id
            """)
        return try await group(rows[0].decode(UUID.self))
    }

    /// Renames or describes a group (nil leaves a field as it is).
    public func updateGroup(_ id: UUID, name: String?, description: String?) async throws -> Group {
        let rows = try await query(
            """
            UPDATE groups SET name = coalesce(\(name), name), description = coalesce(\(description), description), updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("group") }
        return try await group(id)
    }

    /// Deletes a group and its memberships.
    public func deleteGroup(_ id: UUID) async throws {
        let group = try await group(id, locking: true)
        try await refuseIfSchedulesSend(to: "groupKeys", key: group.key, what: "group")
        let rows = try await query("DELETE FROM groups WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id")
        guard !rows.isEmpty else { throw StoreError.notFound("group") }
    }

    /// Adds a member; returns false when they already were one.
    @discardableResult
    public func addGroupMember(_ groupID: UUID, _ userID: UUID) async throws -> Bool {
        _ = try await group(groupID)
        _ = try await user(userID)
        let rows = try await query(
            """
            INSERT INTO group_members (organisation_id, group_id, user_id) VALUES (\(organisationID), \(groupID), \(userID))
            ON CONFLICT DO NOTHING RETURNING user_id
            """)
        return !rows.isEmpty
    }

    /// Removes a member; returns false when they were not one.
    @discardableResult
    public func removeGroupMember(_ groupID: UUID, _ userID: UUID) async throws -> Bool {
        _ = try await group(groupID)
        _ = try await user(userID)
        let rows = try await query(
            "DELETE FROM group_members WHERE organisation_id = \(organisationID) AND group_id = \(groupID) AND user_id = \(userID) RETURNING user_id"
        )
        return !rows.isEmpty
    }
}

private let groupColumns = """
    g.id, g.key, g.name, g.description,
    (SELECT count(*) FROM group_members m WHERE m.organisation_id = g.organisation_id AND m.group_id = g.id),
    g.created_at, g.updated_at
    """

private func decodeGroup(_ row: PostgresRow) throws -> Group {
    let (id, key, name, description, count, created, updated) = try row.decode((UUID, String, String, String, Int, Date, Date).self)
    return Group(id: id, key: key, name: name, description: description, memberCount: count, createdAt: created, updatedAt: updated)
}
