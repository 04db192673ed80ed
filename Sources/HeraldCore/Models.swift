import Foundation

/// A tenant of Herald.
public struct Organisation: Sendable, Equatable {
    public var id: UUID
    public var slug: String
    public var name: String
    public var defaultLocale: String
    public var defaultTimezone: String
    /// Most notifications per user, per category, per minute; nil when unlimited.
    public var throttlePerMinute: Int?
    /// Most notifications per user per minute across all categories; nil when unlimited.
    public var userThrottlePerMinute: Int? = nil
    /// The sender of the organisation's email (Herald's default when nil), its display name, and Reply-To.
    public var emailFrom: String?
    public var emailFromName: String?
    public var emailReplyTo: String?
    public var createdAt: Date
    public var updatedAt: Date

    public init(
        id: UUID, slug: String, name: String, defaultLocale: String, defaultTimezone: String, throttlePerMinute: Int? = nil,
        emailFrom: String? = nil, emailFromName: String? = nil, emailReplyTo: String? = nil, createdAt: Date, updatedAt: Date
    ) {
        self.throttlePerMinute = throttlePerMinute
        self.emailFrom = emailFrom
        self.emailFromName = emailFromName
        self.emailReplyTo = emailReplyTo
        self.id = id
        self.slug = slug
        self.name = name
        self.defaultLocale = defaultLocale
        self.defaultTimezone = defaultTimezone
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// A member of an organisation; also a recipient of notifications.
public struct User: Sendable, Equatable {
    public var id: UUID
    public var email: String
    public var displayName: String
    public var locale: String?
    public var timezone: String?
    public var active: Bool
    /// Free-form attributes as a JSON object, kept as text so no layer reinterprets it.
    public var attributesJSON: String
    public var roles: [RoleRef]
    public var createdAt: Date
    public var updatedAt: Date

    public init(
        id: UUID, email: String, displayName: String, locale: String?, timezone: String?, active: Bool,
        attributesJSON: String, roles: [RoleRef], createdAt: Date, updatedAt: Date
    ) {
        self.id = id
        self.email = email
        self.displayName = displayName
        self.locale = locale
        self.timezone = timezone
        self.active = active
        self.attributesJSON = attributesJSON
        self.roles = roles
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// A role as it appears on a user: id and key.
public struct RoleRef: Sendable, Equatable, Codable {
    public var id: UUID
    public var key: String
    public init(id: UUID, key: String) {
        self.id = id
        self.key = key
    }
}

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

    public init(
        id: UUID, key: String, name: String, description: String, builtin: Bool, permissions: Set<Permission>, createdAt: Date,
        updatedAt: Date
    ) {
        self.id = id
        self.key = key
        self.name = name
        self.description = description
        self.builtin = builtin
        self.permissions = permissions
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// A named set of users, e.g. the participants of one internship.
public struct Group: Sendable, Equatable {
    public var id: UUID
    public var key: String
    public var name: String
    public var description: String
    public var memberCount: Int
    public var createdAt: Date
    public var updatedAt: Date

    public init(id: UUID, key: String, name: String, description: String, memberCount: Int, createdAt: Date, updatedAt: Date) {
        self.id = id
        self.key = key
        self.name = name
        self.description = description
        self.memberCount = memberCount
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// An integrator's credential. The secret is never stored, only its hash.
public struct ApiKey: Sendable, Equatable {
    public var id: UUID
    public var name: String
    public var roleID: UUID
    public var createdAt: Date
    public var lastUsedAt: Date?
    public var expiresAt: Date?
    public var revokedAt: Date?

    public init(id: UUID, name: String, roleID: UUID, createdAt: Date, lastUsedAt: Date?, expiresAt: Date?, revokedAt: Date?) {
        self.id = id
        self.name = name
        self.roleID = roleID
        self.createdAt = createdAt
        self.lastUsedAt = lastUsedAt
        self.expiresAt = expiresAt
        self.revokedAt = revokedAt
    }
}

/// Who acted: a user, an API key, or Herald itself (CLI, maintenance).
public enum Actor: Sendable, Equatable {
    case user(UUID)
    case apiKey(UUID)
    case system

    public var kind: String {
        switch self {
        case .user: "user"
        case .apiKey: "api_key"
        case .system: "system"
        }
    }

    public var id: UUID? {
        switch self {
        case .user(let id), .apiKey(let id): id
        case .system: nil
        }
    }
}

/// One recorded admin change.
public struct AuditEntry: Sendable, Equatable {
    public var id: UUID
    public var occurredAt: Date
    public var actorType: String
    public var actorID: UUID?
    public var action: String
    public var targetType: String
    public var targetID: String?
    public var beforeJSON: String?
    public var afterJSON: String?
    public var requestID: String?

    public init(
        id: UUID, occurredAt: Date, actorType: String, actorID: UUID?, action: String, targetType: String,
        targetID: String?, beforeJSON: String?, afterJSON: String?, requestID: String?
    ) {
        self.id = id
        self.occurredAt = occurredAt
        self.actorType = actorType
        self.actorID = actorID
        self.action = action
        self.targetType = targetType
        self.targetID = targetID
        self.beforeJSON = beforeJSON
        self.afterJSON = afterJSON
        self.requestID = requestID
    }
}

/// One page of a keyset-paginated list.
public struct Page<Item: Sendable>: Sendable {
    public var items: [Item]
    public var next: PageCursor?
    public init(items: [Item], next: PageCursor?) {
        self.items = items
        self.next = next
    }
}

extension Actor {
    /// The acting user's id, when a user acts.
    public var userID: UUID? {
        if case .user(let id) = self { return id }
        return nil
    }
}
