import Foundation
import HeraldCore
import PostgresNIO

/// A category of notifications, e.g. alerts or activity; critical ones are always shown in-app.
public struct Category: Sendable, Equatable {
    public var id: UUID
    public var key: String
    public var name: String
    public var description: String
    public var critical: Bool
    public var createdAt: Date
    public var updatedAt: Date
}

/// A notification type, e.g. `ISQ_CRITICAL`, with its defaults and templates.
public struct NotificationType: Sendable, Equatable {
    public var id: UUID
    public var key: String
    public var categoryID: UUID
    public var categoryKey: String
    public var name: String
    public var description: String
    public var defaultSeverity: Severity
    public var defaultPriority: Priority
    public var defaultChannels: [NotificationChannel]
    /// Templates by channel, then locale.
    public var templates: [NotificationChannel: [String: TemplateContent]]
    public var createdAt: Date
    public var updatedAt: Date
}

/// Fields of a notification type as written.
public struct NotificationTypeFields: Sendable {
    public var key: String
    public var categoryID: UUID
    public var name: String
    public var description: String
    public var defaultSeverity: Severity
    public var defaultPriority: Priority
    public var defaultChannels: [NotificationChannel]

    public init(
        key: String, categoryID: UUID, name: String, description: String, defaultSeverity: Severity,
        defaultPriority: Priority, defaultChannels: [NotificationChannel]
    ) {
        self.key = key
        self.categoryID = categoryID
        self.name = name
        self.description = description
        self.defaultSeverity = defaultSeverity
        self.defaultPriority = defaultPriority
        self.defaultChannels = defaultChannels.keepingFirstOfEach()
    }
}

extension TenantTransaction {
    // MARK: Categories

    public func categories() async throws -> [Category] {
        try await query("SELECT \(unescaped: categoryColumns) FROM categories WHERE organisation_id = \(organisationID) ORDER BY key").map(
            decodeCategory)
    }

    public func category(_ id: UUID) async throws -> Category {
        guard
            let row = try await query(
                "SELECT \(unescaped: categoryColumns) FROM categories WHERE organisation_id = \(organisationID) AND id = \(id)"
            ).first
        else {
            throw StoreError.notFound("category")
        }
        return try decodeCategory(row)
    }

    public func category(key: String) async throws -> Category? {
        try await query("SELECT \(unescaped: categoryColumns) FROM categories WHERE organisation_id = \(organisationID) AND key = \(key)")
            .first.map(decodeCategory)
    }

    public func createCategory(key: String, name: String, description: String, critical: Bool) async throws -> Category {
        let rows = try await query(
            """
            INSERT INTO categories (organisation_id, key, name, description, critical)
            VALUES (\(organisationID), \(key), \(name), \(description), \(critical)) RETURNING id
            """)
        return try await category(rows[0].decode(UUID.self))
    }

    public func updateCategory(_ id: UUID, name: String?, description: String?, critical: Bool?) async throws -> Category {
        let rows = try await query(
            """
            UPDATE categories SET name = coalesce(\(name), name), description = coalesce(\(description), description),
                critical = coalesce(\(critical), critical), updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("category") }
        if critical == true {
            // In-app of a critical category is always on, at once, without conditions: settings
            // that said otherwise would never apply, and could not be saved again (a 422).
            for table in ["preferences", "preference_defaults"] {
                try await query(
                    """
                    DELETE FROM \(unescaped: table) WHERE organisation_id = \(organisationID) AND category_id = \(id) AND channel = 'in_app'
                      AND (NOT enabled OR frequency <> 'IMMEDIATE' OR conditions <> '[]'::jsonb)
                    """)
            }
        }
        return try await category(id)
    }

    /// Deletes a category; a notification type still in it, or in-app rows of it, block the
    /// deletion (`stillReferenced`).
    public func deleteCategory(_ id: UUID) async throws {
        guard
            try await query("SELECT 1 FROM notifications WHERE organisation_id = \(organisationID) AND category_id = \(id) LIMIT 1").isEmpty
        else {
            throw StoreError.stillReferenced(constraint: "notifications_category")
        }
        guard !(try await query("DELETE FROM categories WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id")).isEmpty
        else { throw StoreError.notFound("category") }
    }

    // MARK: Notification types

    public func notificationTypes() async throws -> [NotificationType] {
        let rows = try await query(
            "SELECT \(unescaped: typeColumns) FROM notification_types t WHERE t.organisation_id = \(organisationID) ORDER BY t.key")
        return try await withTemplates(try rows.map(decodeType))
    }

    public func notificationType(_ id: UUID) async throws -> NotificationType {
        guard
            let row = try await query(
                "SELECT \(unescaped: typeColumns) FROM notification_types t WHERE t.organisation_id = \(organisationID) AND t.id = \(id)"
            ).first
        else {
            throw StoreError.notFound("notification type")
        }
        return try await withTemplates([try decodeType(row)])[0]
    }

    public func notificationType(key: String) async throws -> NotificationType? {
        let (found, templates) = try await read(typeRead(key: key), templatesRead(typeKey: key))
        return found.map { type in
            var type = type
            type.templates = templates
            return type
        }
    }

    /// Those of `keys` that name no notification type of the organisation, in the order given.
    public func unknownTypeKeys(_ keys: [String]) async throws -> [String] {
        guard !keys.isEmpty else { return [] }
        let known = Set(
            try await query(
                "SELECT key FROM notification_types WHERE organisation_id = \(organisationID) AND key = ANY(\(keys)::text[])"
            ).map { try $0.decode(String.self) })
        return keys.filter { !known.contains($0) }
    }

    /// The type with this key, without its templates (`templatesRead`), or nil.
    func typeRead(key: String) -> StoreRead<NotificationType?> {
        StoreRead(
            statement:
                "SELECT \(unescaped: typeColumns) FROM notification_types t WHERE t.organisation_id = \(organisationID) AND t.key = \(key)",
            decode: { try $0.first.map(decodeType) })
    }

    /// The templates of the type with this key, by channel and locale.
    func templatesRead(typeKey: String) -> StoreRead<[NotificationChannel: [String: TemplateContent]]> {
        StoreRead(
            statement: """
                SELECT type_id, channel, locale, subject, body, html FROM templates
                WHERE organisation_id = \(organisationID)
                  AND type_id = (SELECT id FROM notification_types WHERE organisation_id = \(organisationID) AND key = \(typeKey))
                """,
            decode: { rows in try templatesByType(rows).first?.value ?? [:] })
    }

    /// The types with these ids, without their templates (`templatesRead(typeIDs:)`), by id.
    func typesRead(ids: [UUID]) -> StoreRead<[UUID: NotificationType]> {
        StoreRead(
            statement: """
                SELECT \(unescaped: typeColumns) FROM notification_types t WHERE t.organisation_id = \(organisationID) AND t.id = ANY(\(ids)::uuid[])
                """,
            decode: { rows in Dictionary(try rows.map(decodeType).map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first }) })
    }

    /// The templates of the types with these ids, by type, channel and locale.
    func templatesRead(typeIDs ids: [UUID]) -> StoreRead<[UUID: [NotificationChannel: [String: TemplateContent]]]> {
        StoreRead(
            statement: """
                SELECT type_id, channel, locale, subject, body, html FROM templates
                WHERE organisation_id = \(organisationID) AND type_id = ANY(\(ids)::uuid[])
                """,
            decode: templatesByType)
    }

    /// The category each of the types with these ids is in, by type id (a join, so a type
    /// moved to another category meanwhile still finds the category it is read with).
    func categoriesRead(ofTypes ids: [UUID]) -> StoreRead<[UUID: Category]> {
        StoreRead(
            statement: """
                SELECT t.id, c.id, c.key, c.name, c.description, c.critical, c.created_at, c.updated_at
                FROM notification_types t JOIN categories c ON c.organisation_id = t.organisation_id AND c.id = t.category_id
                WHERE t.organisation_id = \(organisationID) AND t.id = ANY(\(ids)::uuid[])
                """,
            decode: { rows in
                var byType: [UUID: Category] = [:]
                for row in rows {
                    let (type, id, key, name, description, critical, created, updated) = try row.decode(
                        (UUID, UUID, String, String, String, Bool, Date, Date).self, table: "categories")
                    byType[type] = Category(
                        id: id, key: key, name: name, description: description, critical: critical, createdAt: created, updatedAt: updated)
                }
                return byType
            })
    }

    /// The category of the type with this key, or nil.
    func categoryRead(typeKey: String) -> StoreRead<Category?> {
        StoreRead(
            statement: """
                SELECT \(unescaped: categoryColumns) FROM categories
                WHERE organisation_id = \(organisationID)
                  AND id = (SELECT category_id FROM notification_types WHERE organisation_id = \(organisationID) AND key = \(typeKey))
                """,
            decode: { try $0.first.map(decodeCategory) })
    }

    public func createNotificationType(_ fields: NotificationTypeFields) async throws -> NotificationType {
        let rows = try await query(
            """
            INSERT INTO notification_types (organisation_id, key, category_id, name, description, default_severity, default_priority, default_channels)
            VALUES (\(organisationID), \(fields.key), \(fields.categoryID), \(fields.name), \(fields.description),
                    \(fields.defaultSeverity), \(fields.defaultPriority), \(fields.defaultChannels))
            RETURNING id
            """)
        return try await notificationType(rows[0].decode(UUID.self))
    }

    public func updateNotificationType(_ id: UUID, _ fields: NotificationTypeFields) async throws -> NotificationType {
        let rows = try await query(
            """
            UPDATE notification_types SET category_id = \(fields.categoryID), name = \(fields.name), description = \(fields.description),
                default_severity = \(fields.defaultSeverity), default_priority = \(fields.defaultPriority),
                default_channels = \(fields.defaultChannels), updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("notification type") }
        return try await notificationType(id)
    }

    /// Deletes a type and its templates; a type with events (`stillReferenced`) or a schedule with
    /// occurrences left (`inUse`) blocks the deletion; finished schedules go with it.
    public func deleteNotificationType(_ id: UUID) async throws {
        guard
            !(try await query("SELECT 1 FROM notification_types WHERE organisation_id = \(organisationID) AND id = \(id) FOR UPDATE"))
                .isEmpty
        else { throw StoreError.notFound("notification type") }
        try await refuseIfSchedulesSend(typeID: id)
        guard
            !(try await query("DELETE FROM notification_types WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id"))
                .isEmpty
        else { throw StoreError.notFound("notification type") }
    }

    /// Creates or replaces the template of a type for a channel and locale; the type's
    /// `updated_at` moves with it (a template is part of the type).
    public func putTemplate(typeID: UUID, channel: NotificationChannel, locale: String, content: TemplateContent) async throws {
        _ = try await notificationType(typeID)
        try await query(
            """
            INSERT INTO templates (organisation_id, type_id, channel, locale, subject, body, html)
            VALUES (\(organisationID), \(typeID), \(channel), \(locale), \(content.subject), \(content.body), \(content.html))
            ON CONFLICT (organisation_id, type_id, channel, locale)
            DO UPDATE SET subject = excluded.subject, body = excluded.body, html = excluded.html, updated_at = now()
            """)
        try await touchType(typeID)
    }

    private func touchType(_ typeID: UUID) async throws {
        try await query("UPDATE notification_types SET updated_at = now() WHERE organisation_id = \(organisationID) AND id = \(typeID)")
    }

    /// Deletes one template; `notFound("template")` when the type has none for that channel and
    /// locale, as a digest template's delete does.
    public func deleteTemplate(typeID: UUID, channel: NotificationChannel, locale: String) async throws {
        _ = try await notificationType(typeID)
        let deleted = try await query(
            "DELETE FROM templates WHERE organisation_id = \(organisationID) AND type_id = \(typeID) AND channel = \(channel) AND locale = \(locale) RETURNING locale"
        )
        guard !deleted.isEmpty else { throw StoreError.notFound("template") }
        try await touchType(typeID)
    }

    private func withTemplates(_ types: [NotificationType]) async throws -> [NotificationType] {
        guard !types.isEmpty else { return types }
        let byType = try await read(templatesRead(typeIDs: types.map(\.id)))
        return types.map { type in
            var type = type
            type.templates = byType[type.id] ?? [:]
            return type
        }
    }
}

/// Template rows (type_id, channel, locale, subject, body, html) by type, channel and locale.
private func templatesByType(_ rows: [PostgresRow]) throws -> [UUID: [NotificationChannel: [String: TemplateContent]]] {
    var byType: [UUID: [NotificationChannel: [String: TemplateContent]]] = [:]
    for row in rows {
        let (typeID, channel, locale, subject, body, html) = try row.decode((UUID, String, String, String, String, String?).self)
        guard let channel = NotificationChannel(rawValue: channel) else { continue }
        byType[typeID, default: [:]][channel, default: [:]][locale] = TemplateContent(subject: subject, body: body, html: html)
    }
    return byType
}

private let categoryColumns = "id, key, name, description, critical, created_at, updated_at"

private func decodeCategory(_ row: PostgresRow) throws -> Category {
    let (id, key, name, description, critical, created, updated) = try row.decode((UUID, String, String, String, Bool, Date, Date).self)
    return Category(id: id, key: key, name: name, description: description, critical: critical, createdAt: created, updatedAt: updated)
}

private let typeColumns = """
    t.id, t.key, t.category_id, (SELECT c.key FROM categories c WHERE c.organisation_id = t.organisation_id AND c.id = t.category_id),
    t.name, t.description, t.default_severity, t.default_priority, t.default_channels, t.created_at, t.updated_at
    """

private func decodeType(_ row: PostgresRow) throws -> NotificationType {
    let (id, key, categoryID, categoryKey, name, description, severity, priority, channels, created, updated) =
        try row.decode(
            (UUID, String, UUID, String, String, String, Severity, Priority, [NotificationChannel], Date, Date).self,
            table: "notification_types")
    return NotificationType(
        id: id, key: key, categoryID: categoryID, categoryKey: categoryKey, name: name, description: description,
        defaultSeverity: severity, defaultPriority: priority,
        defaultChannels: channels, templates: [:], createdAt: created, updatedAt: updated)
}
