import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listUsers(_ input: Operations.ListUsers.Input) async throws -> Operations.ListUsers.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let search = input.query.q.flatMap { $0.isEmpty ? nil : $0 }
        let page = try await tenant { tx, _ in
            try await tx.users(search: search, active: input.query.active, limit: limit, after: cursor)
        }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.User.init), nextCursor: page.next?.encoded))))
    }

    func createUser(_ input: Operations.CreateUser.Input) async throws -> Operations.CreateUser.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        var new = NewUser(
            email: try Validate.emailAddress(body.email),
            displayName: try Validate.text(body.displayName, field: "display_name"),
            locale: try body.locale.map { v throws(ValidationError) in try Validate.locale(v) },
            timezone: try body.timezone.flatMap { v throws(ValidationError) in v.isEmpty ? nil : try Validate.timezone(v) })
        if let attributes = body.attributes { new.attributes = try Validate.attributes(try convert(attributes)) }
        (new.digestHour, new.digestWeekday) = try digestTime(hour: body.digestHour, weekday: body.digestWeekday)
        new.quietHours = try quietHours(body.quietHours) ?? nil
        if let password = body.password {
            let checked = try Validate.password(password)
            new.passwordHash = try await passwords.hash(checked)
        }
        let created = try await tenant { tx, _ in
            // A new user reads their own feed and edits their own preferences: the member role,
            // which holds only that (a backend's users got no role, and their bell answered 403).
            let made = try await tx.createUser(new)
            try await tx.grantMemberRole(to: [made.id])
            let user = try Components.Schemas.User(try await tx.user(made.id))
            try await tx.audit(action: "user.create", targetType: "user", targetID: user.id, before: nil, after: try auditValue(user))
            return user
        }
        return .created(.init(body: .json(created)))
    }

    /// Up to 1 000 users in one transaction, all or none (a platform trial made 6 000 calls for
    /// 3 000 users and their group).
    func importUsers(_ input: Operations.ImportUsers.Input) async throws -> Operations.ImportUsers.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        guard !body.users.isEmpty else {
            throw APIError.unprocessable(ValidationError(field: "users", message: "must have at least 1 item."))
        }
        var seen: [String: Int] = [:]
        let users = try body.users.enumerated().map { index, item in
            let at = "users[\(index)]"
            var new = NewUser(
                email: try Validate.emailAddress(item.email, field: "\(at).email"),
                displayName: try Validate.text(item.displayName, field: "\(at).display_name"),
                locale: try item.locale.map { v throws(ValidationError) in try Validate.locale(v, field: "\(at).locale") },
                timezone: try item.timezone.flatMap { v throws(ValidationError) in
                    v.isEmpty ? nil : try Validate.timezone(v, field: "\(at).timezone")
                })
            if let attributes = item.attributes {
                new.attributes = try Validate.attributes(try convert(attributes), field: "\(at).attributes")
            }
            (new.digestHour, new.digestWeekday) = try digestTime(hour: item.digestHour, weekday: item.digestWeekday, at: "\(at).")
            new.quietHours = try quietHours(item.quietHours, at: "\(at).") ?? nil
            // A conflict, as with an existing user's (the schema allows it; the data does not).
            if let first = seen.updateValue(index, forKey: new.email.lowercased()) {
                throw APIError.conflict("\(at).email: the same address as users[\(first)]; nothing was imported.")
            }
            return new
        }
        let groups = try (body.groupIds ?? []).enumerated().map { index, text in
            guard let group = Validate.uuid(text) else {
                throw APIError.unprocessable(ValidationError(field: "group_ids[\(index)]", message: "must be a group's id (a UUID)."))
            }
            return group
        }
        let skipExisting = body.skipExisting ?? false
        let result = try await tenant { tx, principal in
            if !groups.isEmpty, !principal.permissions.contains(.groupsManage) { throw APIError.forbidden(.groupsManage) }
            let imported = try await tx.importUsers(users, groups: groups)
            if !skipExisting, let index = imported.users.firstIndex(where: { !$0.created }) {
                throw APIError.conflict(
                    "users[\(index)].email: \(users[index].email) already has a user; nothing was imported (skip_existing: true leaves existing users as they are)."
                )
            }
            try await tx.grantMemberRole(to: imported.users.filter(\.created).map(\.id))
            let created = imported.users.filter(\.created).map { JSONValue.string($0.id.lowercased) }
            let existing = imported.users.filter { !$0.created }.map { JSONValue.string($0.id.lowercased) }
            // Each group's new members under the group, as one add would be (found by its id);
            // the import itself when it created someone. A call that changed nothing leaves no entry.
            for group in groups {
                guard let members = imported.addedToGroups[group], !members.isEmpty else { continue }
                try await tx.audit(
                    action: "group.member.add", targetType: "group", targetID: group.lowercased, before: nil,
                    after: try auditValue(
                        ["user_ids": .array(members.map { .string($0.lowercased) }), "by": .string("user.import")] as [String: JSONValue]))
            }
            if !created.isEmpty {
                try await tx.audit(
                    action: "user.import", targetType: "organisation", targetID: tx.organisationID.lowercased, before: nil,
                    after: try auditValue(
                        [
                            "created": .array(created), "existing": .array(existing),
                            "group_ids": .array(groups.map { .string($0.lowercased) }),
                        ] as [String: JSONValue]))
            }
            return Components.Schemas.UserImportResult(
                created: created.count, existing: existing.count,
                users: imported.users.map { .init(id: $0.id.lowercased, email: $0.email, created: $0.created, active: $0.active) })
        }
        return .ok(.init(body: .json(result)))
    }

    func getUser(_ input: Operations.GetUser.Input) async throws -> Operations.GetUser.Output {
        let id = try id(input.path.userId, "user")
        let user = try await tenant { tx, _ in try Components.Schemas.User(try await tx.user(id)) }
        return .ok(.init(body: .json(user)))
    }

    func updateUser(_ input: Operations.UpdateUser.Input) async throws -> Operations.UpdateUser.Output {
        let id = try id(input.path.userId, "user")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        var change = try profileChange(
            displayName: body.displayName, locale: body.locale, timezone: body.timezone, digestHour: body.digestHour,
            digestWeekday: body.digestWeekday, quietHours: body.quietHours)
        change.email = try body.email.map { v throws(ValidationError) in try Validate.emailAddress(v) }
        if let attributes = body.attributes { change.attributes = try Validate.attributes(try convert(attributes)) }
        let updated = try await tenant { tx, principal in
            try await applyUserChange(id, change, tx) {
                try requireHolds(try await tx.permissions(ofUser: id).filter { !$0.concernsOnlyTheHolder }, principal)
            }
        }
        return .ok(.init(body: .json(updated)))
    }

    /// A user's own settings, from `PATCH /v1/me`: what `updateUser` changes of them, on themselves.
    func updateMe(_ input: Operations.UpdateMe.Input) async throws -> Operations.UpdateMe.Output {
        let user = try requireUser()
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let change = try profileChange(
            displayName: body.displayName, locale: body.locale, timezone: body.timezone, digestHour: body.digestHour,
            digestWeekday: body.digestWeekday, quietHours: body.quietHours)
        let principal = try RequestScope.get().requirePrincipal()
        let profile = try await tenant { tx, _ in
            _ = try await applyUserChange(user, change, tx) {}
            return try await self.profile(of: user, tx)
        }
        return .ok(.init(body: .json(me(principal, profile: profile))))
    }

    /// The fields a user may change of themselves, validated: an empty locale or time zone, an
    /// hour of -1 or a weekday of 0 clears it, so the organisation's applies; quiet hours of `{}`
    /// clear them.
    func profileChange(
        displayName: String?, locale: String?, timezone: String?, digestHour: Int?, digestWeekday: Int?,
        quietHours setting: Components.Schemas.QuietHoursSetting?
    ) throws -> UserChange {
        var change = UserChange(
            displayName: try displayName.map { v throws(ValidationError) in try Validate.text(v, field: "display_name") },
            locale: try locale.map { v throws(ValidationError) in v.isEmpty ? nil : try Validate.locale(v) },
            timezone: try timezone.map { v throws(ValidationError) in v.isEmpty ? nil : try Validate.timezone(v) })
        let (hour, weekday) = try digestTime(hour: digestHour, weekday: digestWeekday)
        if digestHour != nil { change.digestHour = .some(hour) }
        if digestWeekday != nil { change.digestWeekday = .some(weekday) }
        change.quietHours = try quietHours(setting)
        return change
    }

    /// Quiet hours as sent: nil when absent, `.some(nil)` for `{}` (none), else the window. One
    /// time without the other, a time that is not HH:MM, or two equal times are a 422.
    func quietHours(_ setting: Components.Schemas.QuietHoursSetting?, at prefix: String = "") throws -> QuietHours?? {
        guard let setting else { return nil }
        let field = "\(prefix)quiet_hours"
        switch (setting.start, setting.end) {
        case (nil, nil):
            return .some(nil)
        case (let start?, let end?):
            func minutes(_ name: String, _ text: String) throws -> Int {
                guard let minutes = QuietHours.minutes(text) else {
                    throw APIError.unprocessable(
                        ValidationError(
                            field: "\(field).\(name)", message: "must be a time of day as HH:MM (24-hour clock, 00:00 to 23:59)."))
                }
                return minutes
            }
            guard let window = QuietHours(start: try minutes("start", start), end: try minutes("end", end)) else {
                throw APIError.unprocessable(
                    ValidationError(field: field, message: "must end at another time than it starts; send {} for no quiet hours."))
            }
            return .some(window)
        default:
            throw APIError.unprocessable(
                ValidationError(field: field, message: "needs both start and end (HH:MM), or neither ({}) for no quiet hours."))
        }
    }

    /// A user's own digest hour and weekday as sent: -1 (the hour; 0 is midnight) and 0 (the
    /// weekday) mean none, so the organisation's applies. `at` prefixes the field's name.
    func digestTime(hour: Int?, weekday: Int?, at prefix: String = "") throws -> (hour: Int?, weekday: Int?) {
        if let hour, !(hour == -1 || (0...23).contains(hour)) {
            throw APIError.unprocessable(
                ValidationError(field: "\(prefix)digest_hour", message: "must be 0 to 23, or -1 for the organisation's."))
        }
        if let weekday, !(0...7).contains(weekday) {
            throw APIError.unprocessable(
                ValidationError(field: "\(prefix)digest_weekday", message: "must be 1 (Monday) to 7 (Sunday), or 0 for the organisation's.")
            )
        }
        return (hour == -1 ? nil : hour, weekday == 0 ? nil : weekday)
    }

    /// Changes user `id` (after `check`, with the user as it was read) and audits `user.update`;
    /// a new digest hour, weekday or time zone moves what waits for a digest to the new time.
    private func applyUserChange(
        _ id: UUID, _ change: UserChange, _ tx: TenantTransaction, check: () async throws -> Void
    ) async throws -> Components.Schemas.User {
        let reslots = change.digestHour != nil || change.digestWeekday != nil || change.timezone != nil
        // Before anything changes: a notify writing this user's digest items commits first
        // (and is moved below), or waits and slots them by the new schedule.
        if reslots { try await tx.holdDigestSchedules() }
        let before = try Components.Schemas.User(try await tx.user(id))
        try await check()
        let after = try Components.Schemas.User(try await tx.updateUser(id, change))
        // A new digest hour, weekday or time zone: what waits goes out once, at the new time.
        if reslots { try await tx.reslotWaitingDigestItems(of: [id], now: now()) }
        try await tx.audit(
            action: "user.update", targetType: "user", targetID: after.id, before: try auditValue(before), after: try auditValue(after))
        return after
    }

    func deactivateUser(_ input: Operations.DeactivateUser.Input) async throws -> Operations.DeactivateUser.Output {
        .ok(.init(body: .json(try await setActive(input.path.userId, false))))
    }

    func reactivateUser(_ input: Operations.ReactivateUser.Input) async throws -> Operations.ReactivateUser.Output {
        .ok(.init(body: .json(try await setActive(input.path.userId, true))))
    }

    private func setActive(_ rawID: String, _ active: Bool) async throws -> Components.Schemas.User {
        let id = try id(rawID, "user")
        let user = try await tenant { tx, principal in
            if !active, principal.actor.userID == id {
                throw APIError.conflict("You cannot deactivate yourself.")
            }
            let before = try Components.Schemas.User(try await tx.user(id))
            // Changing someone needs every permission they hold: a service key cannot lock out an owner.
            try requireHolds(try await tx.permissions(ofUser: id).filter { !$0.concernsOnlyTheHolder }, principal)
            // Already so (a retry, a second click): nothing changes, nothing is audited.
            if before.active == active { return before }
            let after = try Components.Schemas.User(try await tx.setUserActive(id, active))
            if !active { try await requireAnOwner(tx) }
            try await tx.audit(
                action: active ? "user.reactivate" : "user.deactivate", targetType: "user", targetID: after.id,
                before: try auditValue(before), after: try auditValue(after))
            return after
        }
        // A deactivation ends the user's sessions (their refresh tokens are revoked): this
        // instance asks the database again for their tokens from now on (the commit follows the
        // handler; other instances hear the bus), and a reactivation does not revive them.
        if !active { tokens.sessions.ended(user: id, now: now()) }
        return user
    }

    /// Sets a user's password (an administrator's reset, or a first one): every session of
    /// theirs ends and a login lock on their account is lifted.
    func setUserPassword(_ input: Operations.SetUserPassword.Input) async throws -> Operations.SetUserPassword.Output {
        let id = try id(input.path.userId, "user")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let password = try Validate.password(body.password)
        let now = now()
        let account = try await tenant { tx, principal in
            if principal.actor.userID == id {
                throw APIError.conflict("Change your own password with PUT /v1/me/password, which asks for the current one.")
            }
            // Taking over a user needs every permission they hold: a user administrator cannot
            // set an owner's password and sign in as the owner. A missing user holds nothing.
            try requireHolds(try await tx.permissions(ofUser: id).filter { !$0.concernsOnlyTheHolder }, principal)
            let email = try await tx.credentials(of: id).email
            // Hashed once the caller may (argon2's 64 MiB and 0.2 s are not spent on a refusal).
            try await tx.setPasswordHash(id, try await passwords.hash(password))
            let ended = try await tx.revokeRefreshTokens(ofUser: id, keeping: nil, at: now)
            try await tx.audit(
                action: "user.password.set", targetType: "user", targetID: id.lowercased, before: nil,
                after: try auditValue(["sessions_ended": ended.count]))
            return LoginLimits.account(organisation: try await tx.organisation().slug, email: email)
        }
        loginLimits.lift(account: account)
        tokens.sessions.ended(user: id, now: now)
        return .noContent(.init())
    }

    /// Erases the user and what Herald recorded about them (a trial: a mistaken import could not
    /// be undone, and an erasure request had no answer). Audited by id alone: the entry must not
    /// keep what was erased.
    func deleteUser(_ input: Operations.DeleteUser.Input) async throws -> Operations.DeleteUser.Output {
        let id = try id(input.path.userId, "user")
        try await tenant { tx, principal in
            if principal.actor.userID == id { throw APIError.conflict("You cannot delete yourself.") }
            // A missing user holds nothing; the erasure answers its 404.
            try requireHolds(try await tx.permissions(ofUser: id).filter { !$0.concernsOnlyTheHolder }, principal)
            let removed = try await tx.eraseUser(id)
            try await requireAnOwner(tx)
            try await tx.audit(
                action: "user.delete", targetType: "user", targetID: id.lowercased,
                before: try auditValue(["id": JSONValue.string(id.lowercased)]),
                after: try auditValue(["erased": JSONValue.object(removed.mapValues { .number(Double($0)) })]))
        }
        tokens.sessions.ended(user: id, now: now())
        return .noContent(.init())
    }

    func setUserRoles(_ input: Operations.SetUserRoles.Input) async throws -> Operations.SetUserRoles.Output {
        let id = try id(input.path.userId, "user")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let roleIDs = try Array(Set(body.roleIds.map { v throws(ValidationError) in try Validate.uuid(v, field: "role_ids") }))
        let updated = try await tenant { tx, principal in
            let before = try Components.Schemas.User(try await tx.user(id))
            let roles = try await tx.roles(roleIDs, referencedBy: "role_ids")
            // Granting (or taking away) a role needs every permission it carries.
            let removed = before.roles.compactMap { UUID(uuidString: $0.id) }.filter { !roleIDs.contains($0) }
            let removedRoles = try await tx.roles(removed, referencedBy: "role_ids")
            try requireHolds(roles.reduce(into: Set()) { $0.formUnion($1.permissions) }, principal)
            try requireHolds(removedRoles.reduce(into: Set()) { $0.formUnion($1.permissions) }, principal)
            let after = try Components.Schemas.User(try await tx.setUserRoles(id, roleIDs))
            try await requireAnOwner(tx)
            try await tx.audit(
                action: "user.roles.set", targetType: "user", targetID: after.id,
                before: try auditValue(before.roles), after: try auditValue(after.roles))
            return after
        }
        return .ok(.init(body: .json(updated)))
    }

    /// An organisation must keep one active owner, or nobody can change its settings again.
    private func requireAnOwner(_ tx: TenantTransaction) async throws {
        guard try await tx.activeOwnerCount() > 0 else {
            throw APIError.conflict("The organisation must keep at least one active owner.")
        }
    }
}
