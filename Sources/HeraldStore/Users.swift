import Foundation
import HeraldCore
import PostgresNIO

/// A member of an organisation; also a recipient of notifications.
public struct User: Sendable, Equatable {
    public var id: UUID
    public var email: String
    public var displayName: String
    public var locale: String?
    public var timezone: String?
    public var active: Bool
    /// The user's own digest hour (0–23) and ISO weekday (1–7); nil: the organisation's.
    public var digestHour: Int?
    public var digestWeekday: Int?
    /// When the user wants no email but critical ones, in their time zone; nil: none.
    public var quietHours: QuietHours?
    /// The last tracked click, login or feed read (the inactivity rule's clock; recorded at most
    /// hourly), and when the rule warned the user (cleared by engagement) or switched their email off.
    public var lastEngagedAt: Date
    public var inactivityWarnedAt: Date?
    public var inactivitySwitchedOffAt: Date?
    /// Free-form attributes: a JSON object.
    public var attributes: JSONValue
    public var roles: [RoleRef]
    public var createdAt: Date
    public var updatedAt: Date
}

/// A role as it appears on a user: id and key.
public struct RoleRef: Sendable, Equatable, Codable {
    public var id: UUID
    public var key: String
}

/// Fields of a new user, already validated.
public struct NewUser: Sendable {
    public var email: String
    public var displayName: String
    public var locale: String?
    public var timezone: String?
    public var attributes: JSONValue
    public var passwordHash: String?
    /// The user's own digest hour (0–23) and ISO weekday (1–7); nil: the organisation's.
    public var digestHour: Int?
    public var digestWeekday: Int?
    public var quietHours: QuietHours?

    public init(
        email: String, displayName: String, locale: String? = nil, timezone: String? = nil, attributes: JSONValue = .object([:]),
        passwordHash: String? = nil, digestHour: Int? = nil, digestWeekday: Int? = nil, quietHours: QuietHours? = nil
    ) {
        self.quietHours = quietHours
        self.digestHour = digestHour
        self.digestWeekday = digestWeekday
        self.email = email
        self.displayName = displayName
        self.locale = locale
        self.timezone = timezone
        self.attributes = attributes
        self.passwordHash = passwordHash
    }
}

/// A change to a user's profile. A nil field stays as it is; `.some(nil)` clears a nullable one.
public struct UserChange: Sendable {
    public var email: String?
    public var displayName: String?
    public var locale: String??
    public var timezone: String??
    public var attributes: JSONValue?
    public var digestHour: Int??
    public var digestWeekday: Int??
    public var quietHours: QuietHours??

    public init(
        email: String? = nil, displayName: String? = nil, locale: String?? = nil, timezone: String?? = nil, attributes: JSONValue? = nil,
        digestHour: Int?? = nil, digestWeekday: Int?? = nil, quietHours: QuietHours?? = nil
    ) {
        self.quietHours = quietHours
        self.digestHour = digestHour
        self.digestWeekday = digestWeekday
        self.email = email
        self.displayName = displayName
        self.locale = locale
        self.timezone = timezone
        self.attributes = attributes
    }
}

/// What login needs to know about a user.
public struct UserCredentials: Sendable {
    public var id: UUID
    public var active: Bool
    public var passwordHash: String?
}

/// One user of an import: created by it, or already there (its stored address and state).
public struct ImportedUser: Sendable {
    public var id: UUID
    public var email: String
    public var created: Bool
    public var active: Bool
}

/// What an import did: its users in the order given, and the members each group gained.
public struct UserImport: Sendable {
    public var users: [ImportedUser]
    public var addedToGroups: [UUID: [UUID]]
}

extension TenantTransaction {
    /// The user with this id, with their roles.
    public func user(_ id: UUID) async throws -> User {
        let rows = try await query(
            """
            SELECT \(unescaped: userColumns) FROM users u WHERE u.organisation_id = \(organisationID) AND u.id = \(id)
            """)
        guard let row = rows.first else { throw StoreError.notFound("user") }
        return try decodeUser(row)
    }

    /// Users in creation order after `cursor`, optionally filtered by a search term or state.
    public func users(search: String?, active: Bool?, limit: Int, after cursor: PageCursor?) async throws -> Page<User> {
        let pattern = search.map {
            "%"
                + $0.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "%", with: "\\%").replacingOccurrences(
                    of: "_", with: "\\_") + "%"
        }
        let rows = try await query(
            """
            SELECT \(unescaped: userColumns) FROM users u
            WHERE u.organisation_id = \(organisationID)
              AND (\(pattern)::text IS NULL OR u.email ILIKE \(pattern) OR u.display_name ILIKE \(pattern))
              AND (\(active)::boolean IS NULL OR u.active = \(active))
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (u.created_at, u.id) > ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY u.created_at, u.id
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeUser), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Members of a group in the order they were created.
    public func groupMembers(_ groupID: UUID, limit: Int, after cursor: PageCursor?) async throws -> Page<User> {
        _ = try await group(groupID)
        let rows = try await query(
            """
            SELECT \(unescaped: userColumns) FROM users u
            JOIN group_members m ON m.organisation_id = u.organisation_id AND m.user_id = u.id
            WHERE u.organisation_id = \(organisationID) AND m.group_id = \(groupID)
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (u.created_at, u.id) > ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY u.created_at, u.id
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeUser), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Creates a user in the current organisation.
    public func createUser(_ new: NewUser) async throws -> User {
        let rows = try await query(
            """
            INSERT INTO users (organisation_id, email, display_name, locale, timezone, attributes, password_hash, digest_hour, digest_weekday,
                               quiet_hours_start, quiet_hours_end)
            VALUES (\(organisationID), \(new.email), \(new.displayName), \(new.locale), \(new.timezone),
                    \(JSONDocument(new.attributes)), \(new.passwordHash), \(new.digestHour)::smallint, \(new.digestWeekday)::smallint,
                    \(new.quietHours?.start)::smallint, \(new.quietHours?.end)::smallint)
            RETURNING id
            """)
        return try await user(rows[0].decode(UUID.self))
    }

    /// Creates `users` in one statement (an import), leaving as it is any user whose address is
    /// already taken, then adds every user of the call to `groups`. Returns, in the order given,
    /// each user's id and whether this call created it. The caller checks the items (as
    /// `createUser`'s are), that no address is given twice, and whether an existing one may stay
    /// (it throws inside the transaction otherwise: nothing is written).
    public func importUsers(_ users: [NewUser], groups: [UUID]) async throws -> UserImport {
        // Locked against a deletion while this runs (a trial's import beside a group's deletion
        // got the foreign key's words instead of the group's).
        let known = try await query(
            "SELECT id FROM groups WHERE organisation_id = \(organisationID) AND id = ANY(\(groups)::uuid[]) FOR KEY SHARE"
        ).map { try $0.decode(UUID.self) }
        if let missing = groups.firstIndex(where: { !known.contains($0) }) {
            throw StoreError.unknownReference(field: "group_ids[\(missing)]", resource: "group")
        }
        // A set-based insert keeps its RETURNING (on a distributed PostgreSQL an INSERT … SELECT
        // without one becomes a COPY, which row-level security refuses).
        let created = try await query(
            """
            INSERT INTO users (organisation_id, email, display_name, locale, timezone, attributes, digest_hour, digest_weekday,
                               quiet_hours_start, quiet_hours_end)
            SELECT \(organisationID), u.email, u.display_name, nullif(u.locale, ''), nullif(u.timezone, ''), u.attributes,
                   nullif(u.digest_hour, -1)::smallint, nullif(u.digest_weekday, 0)::smallint,
                   nullif(u.quiet_start, -1)::smallint, nullif(u.quiet_end, -1)::smallint
            FROM unnest(\(users.map(\.email))::text[], \(users.map(\.displayName))::text[], \(users.map { $0.locale ?? "" })::text[],
                        \(users.map { $0.timezone ?? "" })::text[], \(users.map { JSONDocument($0.attributes) })::jsonb[],
                        \(users.map { $0.digestHour ?? -1 })::integer[], \(users.map { $0.digestWeekday ?? 0 })::integer[],
                        \(users.map { $0.quietHours?.start ?? -1 })::integer[], \(users.map { $0.quietHours?.end ?? -1 })::integer[])
                 AS u (email, display_name, locale, timezone, attributes, digest_hour, digest_weekday, quiet_start, quiet_end)
            ON CONFLICT (organisation_id, lower(email)) DO NOTHING
            RETURNING id, email
            """
        ).map { try $0.decode((UUID, String).self) }
        // By the address as given (PostgreSQL's lower() and Swift's need not agree on every letter).
        var ids: [String: ImportedUser] = [:]
        for (id, email) in created { ids[email] = ImportedUser(id: id, email: email, created: true, active: true) }
        let others = users.map(\.email).filter { ids[$0] == nil }
        if !others.isEmpty {
            for row in try await query(
                """
                SELECT u.id, i.email, u.email, u.active FROM unnest(\(others)::text[]) AS i (email)
                JOIN users u ON u.organisation_id = \(organisationID) AND lower(u.email) = lower(i.email)
                """)
            {
                let (id, given, stored, active) = try row.decode((UUID, String, String, Bool).self)
                ids[given] = ImportedUser(id: id, email: stored, created: false, active: active)
            }
        }
        let result = try users.map { user in
            guard let entry = ids[user.email] else { throw StoreError.notFound("user") }
            return entry
        }
        var added: [UUID: [UUID]] = [:]
        if !groups.isEmpty {
            for row in try await query(
                """
                INSERT INTO group_members (organisation_id, group_id, user_id)
                SELECT \(organisationID), g, u FROM unnest(\(groups)::uuid[]) g CROSS JOIN unnest(\(result.map(\.id))::uuid[]) u
                ON CONFLICT DO NOTHING
                RETURNING group_id, user_id
                """)
            {
                let (group, user) = try row.decode((UUID, UUID).self)
                added[group, default: []].append(user)
            }
        }
        return UserImport(users: result, addedToGroups: added)
    }

    /// Erases a user and everything recorded about them (GDPR article 17): their in-app rows,
    /// deliveries and attempt logs, decision trace rows, digest items and runs, preferences,
    /// group memberships, roles, sessions and feed state; keys they created stay, without their
    /// creator. The audit log keeps its entries about them without the values they recorded.
    /// Refused (409) while a message or digest to them is being sent, or a schedule with
    /// occurrences left names them: those would fail or go out after the erasure. Returns the
    /// deliveries, in-app rows and digest items removed.
    public func eraseUser(_ id: UUID) async throws -> [String: Int] {
        // Locked first: a fan-out chunk writing to the user holds it FOR KEY SHARE until it commits.
        guard try await !query("SELECT id FROM users WHERE organisation_id = \(organisationID) AND id = \(id) FOR UPDATE").isEmpty else {
            throw StoreError.notFound("user")
        }
        try await refuseIfSchedulesName(user: id)
        // Their deliveries locked: a claim skips them from here, and one claimed before is seen
        // as it committed. A message being sent would fail to record, or go out, once erased.
        let (sending, deliveries) = try await query(
            """
            SELECT count(*) FILTER (WHERE d.status = 'SENDING')::int, count(*)::int FROM (
                SELECT status FROM deliveries WHERE organisation_id = \(organisationID) AND user_id = \(id) FOR UPDATE) d
            """
        )[0].decode((Int, Int).self)
        // Their digest runs locked the same way, their old in-app texts and the audit's values
        // about them removed (0063: what the application may not do itself).
        let digests = sending > 0 ? 0 : try await query("SELECT erase_user_records(\(id))")[0].decode(Int.self)
        guard sending + digests == 0 else {
            let count = sending + digests
            throw StoreError.inUse(
                "\(count == 1 ? "A message to this user is" : "\(count) messages to this user are") being sent right now; try again in a few seconds."
            )
        }
        let (notifications, digestItems) = try await query(
            """
            SELECT (SELECT count(*)::int FROM notifications WHERE organisation_id = \(organisationID) AND user_id = \(id)),
                   (SELECT count(*)::int FROM digest_items WHERE organisation_id = \(organisationID) AND user_id = \(id))
            """
        )[0].decode((Int, Int).self)
        try await query(
            "UPDATE api_keys SET created_by_user_id = NULL WHERE organisation_id = \(organisationID) AND created_by_user_id = \(id)")
        // Deactivated first: its announcement ends the user's open streams on every instance.
        _ = try await setUserActive(id, false)
        // The rest goes with the row: by foreign key, and by users_delete_rows (0030, 0063).
        try await query("DELETE FROM users WHERE organisation_id = \(organisationID) AND id = \(id)")
        return ["deliveries": deliveries, "notifications": notifications, "digest_items": digestItems]
    }

    /// Applies `change` to the user's profile.
    public func updateUser(_ id: UUID, _ change: UserChange) async throws -> User {
        let rows = try await query(
            """
            UPDATE users SET
                email = coalesce(\(change.email), email),
                display_name = coalesce(\(change.displayName), display_name),
                locale = CASE WHEN \(change.locale != nil) THEN \(change.locale ?? nil) ELSE locale END,
                timezone = CASE WHEN \(change.timezone != nil) THEN \(change.timezone ?? nil) ELSE timezone END,
                attributes = coalesce(\(change.attributes.map { JSONDocument($0) }), attributes),
                digest_hour = CASE WHEN \(change.digestHour != nil) THEN \(change.digestHour ?? nil)::smallint ELSE digest_hour END,
                digest_weekday = CASE WHEN \(change.digestWeekday != nil) THEN \(change.digestWeekday ?? nil)::smallint ELSE digest_weekday END,
                quiet_hours_start = CASE WHEN \(change.quietHours != nil) THEN \(change.quietHours??.start)::smallint ELSE quiet_hours_start END,
                quiet_hours_end = CASE WHEN \(change.quietHours != nil) THEN \(change.quietHours??.end)::smallint ELSE quiet_hours_end END,
                updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id)
            RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("user") }
        return try await user(id)
    }

    /// Activates or deactivates a user. Deactivation also ends every session of theirs.
    public func setUserActive(_ id: UUID, _ active: Bool) async throws -> User {
        let rows = try await query(
            """
            UPDATE users SET active = \(active),
                deactivated_at = CASE WHEN \(active) THEN NULL ELSE coalesce(deactivated_at, now()) END,
                updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id)
            RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("user") }
        if !active {
            try await query(
                "UPDATE refresh_tokens SET revoked_at = now() WHERE organisation_id = \(organisationID) AND user_id = \(id) AND revoked_at IS NULL"
            )
        }
        return try await user(id)
    }

    /// Replaces the user's roles with `roleIDs`. A role id outside this organisation is an invalid reference.
    public func setUserRoles(_ id: UUID, _ roleIDs: [UUID]) async throws -> User {
        _ = try await user(id)
        try await query("DELETE FROM user_roles WHERE organisation_id = \(organisationID) AND user_id = \(id)")
        if !roleIDs.isEmpty {
            try await query(
                """
                INSERT INTO user_roles (organisation_id, user_id, role_id)
                SELECT \(organisationID), \(id), r FROM unnest(\(roleIDs)::uuid[]) AS r
                """)
        }
        try await query("UPDATE users SET updated_at = now() WHERE organisation_id = \(organisationID) AND id = \(id)")
        return try await user(id)
    }

    /// Gives `users` the built-in member role (their own feed and preferences), in one statement.
    public func grantMemberRole(to users: [UUID]) async throws {
        guard !users.isEmpty else { return }
        let member = try await builtinRole(.member)
        try await query(
            """
            INSERT INTO user_roles (organisation_id, user_id, role_id)
            SELECT \(organisationID), u, \(member.id) FROM unnest(\(users)::uuid[]) AS u
            ON CONFLICT DO NOTHING
            """)
    }

    /// The password hash and state of the user with this email, for login.
    public func credentials(email: String) async throws -> UserCredentials? {
        let rows = try await query(
            "SELECT id, active, password_hash FROM users WHERE organisation_id = \(organisationID) AND lower(email) = lower(\(email))")
        guard let row = rows.first else { return nil }
        let (id, active, hash) = try row.decode((UUID, Bool, String?).self)
        return UserCredentials(id: id, active: active, passwordHash: hash)
    }

    /// The email, state and password hash of user `id`, for a change of password.
    public func credentials(of id: UUID) async throws -> (email: String, credentials: UserCredentials) {
        let rows = try await query(
            "SELECT email, active, password_hash FROM users WHERE organisation_id = \(organisationID) AND id = \(id)")
        guard let row = rows.first else { throw StoreError.notFound("user") }
        let (email, active, hash) = try row.decode((String, Bool, String?).self)
        return (email, UserCredentials(id: id, active: active, passwordHash: hash))
    }

    /// Replaces the password hash `current` with `hash`; false when it was not `current` any more
    /// (a change that ran meanwhile).
    public func replacePasswordHash(_ id: UUID, _ current: String, with hash: String) async throws -> Bool {
        let rows = try await query(
            """
            UPDATE users SET password_hash = \(hash), updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) AND password_hash = \(current) RETURNING id
            """)
        return !rows.isEmpty
    }

    /// Sets a new password hash.
    public func setPasswordHash(_ id: UUID, _ hash: String) async throws {
        let rows = try await query(
            "UPDATE users SET password_hash = \(hash), updated_at = now() WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id"
        )
        guard !rows.isEmpty else { throw StoreError.notFound("user") }
    }
}

private let userColumns = """
    u.id, u.email, u.display_name, u.locale, u.timezone, u.active, u.attributes,
    coalesce((SELECT json_agg(json_build_object('id', r.id, 'key', r.key) ORDER BY r.key)
              FROM user_roles ur JOIN roles r ON r.organisation_id = ur.organisation_id AND r.id = ur.role_id
              WHERE ur.organisation_id = u.organisation_id AND ur.user_id = u.id), '[]'),
    u.created_at, u.updated_at, u.digest_hour::int, u.digest_weekday::int, u.last_engaged_at, u.inactivity_warned_at,
    u.inactivity_switched_off_at, u.quiet_hours_start::int, u.quiet_hours_end::int
    """

private func decodeUser(_ row: PostgresRow) throws -> User {
    let (
        id, email, name, locale, timezone, active, attributes, roles, created, updated, digestHour, digestWeekday, engaged, warned, off,
        quietStart, quietEnd
    ) =
        try row.decode(
            (
                UUID, String, String, String?, String?, Bool, JSONDocument<JSONValue>, JSONDocument<[RoleRef]>, Date, Date, Int?, Int?,
                Date, Date?, Date?, Int?, Int?
            )
            .self,
            table: "users")
    return User(
        id: id, email: email, displayName: name, locale: locale, timezone: timezone, active: active, digestHour: digestHour,
        digestWeekday: digestWeekday, quietHours: QuietHours.stored(start: quietStart, end: quietEnd), lastEngagedAt: engaged,
        inactivityWarnedAt: warned, inactivitySwitchedOffAt: off,
        attributes: attributes.value, roles: roles.value, createdAt: created, updatedAt: updated)
}

extension TenantTransaction {
    /// The users with these ids (missing ones are left out).
    public func users(ids: [UUID]) async throws -> [User] {
        guard !ids.isEmpty else { return [] }
        return try await query(
            "SELECT \(unescaped: userColumns) FROM users u WHERE u.organisation_id = \(organisationID) AND u.id = ANY(\(ids)::uuid[])"
        ).map(decodeUser)
    }
}
