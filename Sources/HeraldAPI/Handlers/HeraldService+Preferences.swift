import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func getPreferenceDefaults(_ input: Operations.GetPreferenceDefaults.Input) async throws -> Operations.GetPreferenceDefaults.Output {
        let list = try await tenant { tx, _ in
            try await preferenceList(try await tx.preferenceDefaults(), tx)
        }
        return .ok(.init(body: .json(list)))
    }

    func replacePreferenceDefaults(
        _ input: Operations.ReplacePreferenceDefaults.Input
    ) async throws -> Operations.ReplacePreferenceDefaults.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let list = try await tenant { tx, _ in
            let current = try await tx.preferenceDefaults()
            let before = try await preferenceList(current, tx)
            let new = try await cells(body, tx)
            try await replacing(current, with: new, of: nil, tx) { try await tx.replacePreferenceDefaults(with: new) }
            let after = try await preferenceList(try await tx.preferenceDefaults(), tx)
            try await tx.audit(
                action: "preference_defaults.replace", targetType: "organisation", targetID: tx.organisationID.lowercased,
                before: try auditValue(before), after: try auditValue(after))
            return after
        }
        return .ok(.init(body: .json(list)))
    }

    func getMyPreferences(_ input: Operations.GetMyPreferences.Input) async throws -> Operations.GetMyPreferences.Output {
        let user = try requireUser()
        let list = try await tenant { tx, _ in try await preferenceList(try await tx.preferences(ofUser: user), tx) }
        return .ok(.init(body: .json(list)))
    }

    func replaceMyPreferences(_ input: Operations.ReplaceMyPreferences.Input) async throws -> Operations.ReplaceMyPreferences.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        return .ok(.init(body: .json(try await replacePreferences(of: try requireUser()) { _ in body })))
    }

    func updateMyPreferences(_ input: Operations.UpdateMyPreferences.Input) async throws -> Operations.UpdateMyPreferences.Output {
        guard case .json(let patch) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        return .ok(.init(body: .json(try await patchPreferences(of: try requireUser(), patch))))
    }

    func updateUserPreferences(_ input: Operations.UpdateUserPreferences.Input) async throws -> Operations.UpdateUserPreferences.Output {
        let id = try id(input.path.userId, "user")
        guard case .json(let patch) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        return .ok(.init(body: .json(try await patchPreferences(of: id, patch))))
    }

    /// Sets `patch.items`, puts `patch.inherit` back to inheriting and keeps the user's other cells.
    private func patchPreferences(
        of userID: UUID, _ patch: Components.Schemas.PreferencePatch
    ) async throws -> Components.Schemas.PreferenceList {
        let set = patch.items ?? []
        let inherit = patch.inherit ?? []
        @Sendable func keyOf(_ category: String, _ channel: Components.Schemas.ChannelName) -> String { "\(category)|\(channel.rawValue)" }
        let setKeys = Set(set.map { keyOf($0.category, $0.channel) })
        if let index = inherit.firstIndex(where: { setKeys.contains(keyOf($0.category, $0.channel)) }) {
            throw APIError.unprocessable(
                ValidationError(
                    field: "inherit[\(index)]",
                    message:
                        "\(inherit[index].category) × \(inherit[index].channel.rawValue) is also in items: set it or inherit it, not both.")
            )
        }
        // Read, changed and written in one transaction: a concurrent change of other cells stays.
        return try await replacePreferences(of: userID) { current in
            let dropped = setKeys.union(inherit.map { keyOf($0.category, $0.channel) })
            return Components.Schemas.PreferenceList(
                items: current.items.filter { !dropped.contains(keyOf($0.category, $0.channel)) } + set)
        }
    }

    func getMyResolvedPreferences(
        _ input: Operations.GetMyResolvedPreferences.Input
    ) async throws -> Operations.GetMyResolvedPreferences.Output {
        .ok(
            .init(
                body: .json(
                    try await resolvedPreferences(of: try requireUser(), typeKey: input.query._type, categoryKey: input.query.category))))
    }

    func getUserPreferences(_ input: Operations.GetUserPreferences.Input) async throws -> Operations.GetUserPreferences.Output {
        let id = try id(input.path.userId, "user")
        let list = try await tenant { tx, _ in
            _ = try await tx.user(id)
            return try await preferenceList(try await tx.preferences(ofUser: id), tx)
        }
        return .ok(.init(body: .json(list)))
    }

    func replaceUserPreferences(_ input: Operations.ReplaceUserPreferences.Input) async throws -> Operations.ReplaceUserPreferences.Output {
        let id = try id(input.path.userId, "user")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        return .ok(.init(body: .json(try await replacePreferences(of: id) { _ in body })))
    }

    func getUserResolvedPreferences(
        _ input: Operations.GetUserResolvedPreferences.Input
    ) async throws -> Operations.GetUserResolvedPreferences.Output {
        let id = try id(input.path.userId, "user")
        return .ok(.init(body: .json(try await resolvedPreferences(of: id, typeKey: input.query._type, categoryKey: input.query.category))))
    }

    // MARK: Shared

    /// The acting user; API keys have no feed or preferences of their own.
    func requireUser() throws -> UUID {
        let principal = try RequestScope.get().requirePrincipal()
        guard let user = principal.actor.userID else {
            throw APIError.badRequest(
                "This operation concerns the calling user's own data; call it with a user's access token, not an API key.")
        }
        return user
    }

    /// Runs `write`, which replaces the cells `current` with `new` (a user's, or with `users`
    /// nil the organisation's defaults). When an email cell changes, the digest items that wait
    /// follow the new frequency (`reslotWaitingDigestItems`: weekly, daily, or now), the
    /// organisation's row held first against notifies writing items (`holdDigestSchedules`);
    /// other changes hold nothing.
    func replacing(
        _ current: [PreferenceCell], with new: [PreferenceCell], of users: [UUID]?, _ tx: TenantTransaction,
        write: () async throws -> Void
    ) async throws {
        let email = { (cells: [PreferenceCell]) in
            Set(cells.filter { $0.channel == .email }.map { "\($0.categoryID)|\($0.setting.enabled)|\($0.setting.frequency.rawValue)" })
        }
        let reslots = email(current) != email(new)
        if reslots { try await tx.holdDigestSchedules() }
        try await write()
        if reslots { try await tx.reslotWaitingDigestItems(of: users, now: now()) }
    }

    /// Replaces a user's cells with what `change` makes of the current list (a PUT's body, or a
    /// PATCH applied), read in the same transaction.
    private func replacePreferences(
        of userID: UUID, _ change: @Sendable (Components.Schemas.PreferenceList) throws -> Components.Schemas.PreferenceList
    ) async throws -> Components.Schemas.PreferenceList {
        try await tenant { tx, principal in
            _ = try await tx.user(userID)
            // An admin changing someone else's settings needs every permission that user holds.
            if principal.actor.userID != userID {
                try requireHolds(try await tx.permissions(ofUser: userID).filter { !$0.concernsOnlyTheHolder }, principal)
            }
            let current = try await tx.preferences(ofUser: userID)
            let before = try await preferenceList(current, tx)
            let new = try await cells(try change(before), tx, personal: true)
            try await replacing(current, with: new, of: [userID], tx) { try await tx.replacePreferences(ofUser: userID, with: new) }
            let after = try await preferenceList(try await tx.preferences(ofUser: userID), tx)
            try await tx.audit(
                action: "preferences.replace", targetType: "user", targetID: userID.lowercased,
                before: try auditValue(before), after: try auditValue(after))
            return after
        }
    }

    /// Every category × channel with its effective value and source. With a type, its default
    /// channels decide the type default. Without, a category's cell that falls back to the type
    /// default is on when any of its types sends on the channel by default, and names those types
    /// (`default_for_types`); a category without types defaults to in-app only.
    private func resolvedPreferences(
        of userID: UUID, typeKey: String?, categoryKey: String?
    ) async throws -> Components.Schemas.ResolvedPreferences {
        try await tenant { tx, _ in
            _ = try await tx.user(userID)
            var categories = try await tx.categories()
            if let categoryKey {
                categories = categories.filter { $0.key == categoryKey }
                guard !categories.isEmpty else {
                    throw APIError.unprocessable(
                        ValidationError(field: "category", message: "names no category of this organisation (\(categoryKey)).")
                    )
                }
            }
            // Per category, the types whose defaults the cells fall back to.
            var types: [UUID: [NotificationType]]
            if let typeKey {
                guard let type = try await tx.notificationType(key: typeKey) else {
                    throw APIError.unknownType(typeKey, field: "type")
                }
                guard categoryKey == nil || categories.contains(where: { $0.id == type.categoryID }) else {
                    throw APIError.unprocessable(
                        ValidationError(field: "type", message: "is not in the category \(categoryKey ?? "") (\(typeKey)).")
                    )
                }
                categories = categories.filter { $0.id == type.categoryID }
                types = [type.categoryID: [type]]
            } else {
                types = Dictionary(grouping: try await tx.notificationTypes(), by: \.categoryID)
            }
            let own = Dictionary(
                try await tx.preferences(ofUser: userID).map { ("\($0.categoryID)|\($0.channel.rawValue)", $0.setting) },
                uniquingKeysWith: { a, _ in a })
            let defaults = Dictionary(
                try await tx.preferenceDefaults().map { ("\($0.categoryID)|\($0.channel.rawValue)", $0.setting) },
                uniquingKeysWith: { a, _ in a })
            var items: [Components.Schemas.ResolvedPreference] = []
            for category in categories {
                let ofCategory = (types[category.id] ?? []).sorted { $0.key < $1.key }
                let typeChannels = ofCategory.isEmpty ? [.inApp] : Set(ofCategory.flatMap(\.defaultChannels))
                for channel in NotificationChannel.allCases {
                    let key = "\(category.id)|\(channel.rawValue)"
                    let effective = PreferenceResolver.resolve(
                        channel: channel, categoryIsCritical: category.critical, typeDefaultChannels: typeChannels,
                        user: channel.isPersonal ? own[key] : nil, organisationDefault: defaults[key])
                    let defaultFor =
                        typeKey == nil && effective.source == .typeDefault
                        ? ofCategory.filter { $0.defaultChannels.contains(channel) }.map(\.key) : nil
                    items.append(
                        .init(
                            category: category.key, channel: mapped(channel), enabled: effective.enabled,
                            frequency: mapped(effective.frequency),
                            conditions: try convert(effective.conditions),
                            source: mapped(effective.source), defaultForTypes: defaultFor))
                }
            }
            return Components.Schemas.ResolvedPreferences(items: items)
        }
    }

    /// Stored cells as the API shows them (category keys instead of ids).
    func preferenceList(_ cells: [PreferenceCell], _ tx: TenantTransaction) async throws -> Components.Schemas.PreferenceList {
        let keys = Dictionary(try await tx.categories().map { ($0.id, $0.key) }, uniquingKeysWith: { a, _ in a })
        return .init(
            items: try cells.compactMap { cell in
                guard let key = keys[cell.categoryID] else { return nil }
                return .init(
                    category: key, channel: mapped(cell.channel), enabled: cell.setting.enabled,
                    frequency: mapped(cell.setting.frequency), conditions: try convert(cell.setting.conditions))
            }.sorted { ($0.category, $0.channel.rawValue) < ($1.category, $1.channel.rawValue) })
    }

    /// Validates a list of cells: known categories, one cell per category and channel, valid
    /// conditions, and no in-app cell of a critical category that the critical override would
    /// silently overrule. `personal`: a user's own, which may not name the organisation's
    /// endpoints' channels (webhook, chat): the organisation's defaults decide those.
    func cells(
        _ list: Components.Schemas.PreferenceList, _ tx: TenantTransaction, personal: Bool = false
    ) async throws -> [PreferenceCell] {
        let categories = Dictionary(try await tx.categories().map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
        // A condition on event.type names types: a typo would make it never hold, silently (a trial).
        let conditionsOf: [[Condition]] = try list.items.map { try convert($0.conditions ?? []) }
        let typeKeys =
            conditionsOf.contains { $0.contains { $0.field == "event.type" } } ? Set(try await tx.notificationTypes().map(\.key)) : []
        var seen = Set<String>()
        return try list.items.enumerated().map { index, item in
            let field = "items[\(index)]"
            guard let category = categories[item.category] else {
                throw APIError.unprocessable(
                    ValidationError(field: "\(field).category", message: "\"\(item.category)\" is not a category of your organisation."))
            }
            let channel = mapped(item.channel, to: NotificationChannel.self)
            if personal, !channel.isPersonal {
                throw APIError.unprocessable(
                    ValidationError(
                        field: "\(field).channel",
                        message:
                            "\(channel.rawValue) goes to your organisation's endpoints, not to one person: the organisation's defaults decide it (PUT /v1/organisation/preference-defaults), not a user's settings."
                    ))
            }
            // Stored, such a cell would read as set while every alert still reached the bell (a trial).
            if category.critical, item.channel == .inApp,
                !item.enabled || item.frequency != .immediate || !(item.conditions ?? []).isEmpty
            {
                throw APIError.unprocessable(
                    ValidationError(
                        field: field,
                        message:
                            "in-app of the critical category \(item.category) is always on, at once and without conditions (the critical override); leave the cell out, or send it enabled, IMMEDIATE and without conditions."
                    ))
            }
            guard seen.insert("\(item.category)|\(item.channel.rawValue)").inserted else {
                throw APIError.unprocessable(
                    ValidationError(field: field, message: "lists \(item.category) × \(item.channel.rawValue) twice."))
            }
            let conditions = conditionsOf[index]
            for (n, condition) in conditions.enumerated() {
                try condition.validate(field: "\(field).conditions[\(n)]")
                guard condition.field == "event.type", [.equals, .in, .notIn].contains(condition.op) else { continue }
                let named = (condition.value.map { [$0] } ?? []) + (condition.values ?? [])
                for case .string(let key) in named where !typeKeys.contains(key) {
                    throw APIError.unprocessable(
                        ValidationError(
                            field: "\(field).conditions[\(n)]",
                            message:
                                "names \"\(key)\", which is not a notification type of your organisation (the condition would never hold).")
                    )
                }
            }
            return PreferenceCell(
                categoryID: category.id, channel: channel,
                setting: PreferenceSetting(
                    enabled: item.enabled, frequency: mapped(item.frequency, to: Frequency.self), conditions: conditions))
        }
    }
}
