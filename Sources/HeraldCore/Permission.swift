/// A permission a role can grant. Every API operation needs one (or only authentication);
/// the table from operation to permission lives in `HeraldAPI/RoutePermissions.swift`.
public enum Permission: String, CaseIterable, Sendable, Codable, Comparable {
    case organisationManage = "organisation.manage"
    case usersRead = "users.read"
    case usersManage = "users.manage"
    case rolesRead = "roles.read"
    case rolesManage = "roles.manage"
    case groupsRead = "groups.read"
    case groupsManage = "groups.manage"
    case apikeysManage = "apikeys.manage"
    case auditRead = "audit.read"
    case eventsSend = "events.send"
    case eventsRead = "events.read"
    case statsRead = "stats.read"
    case notificationsRead = "notifications.read"
    case preferencesManage = "preferences.manage"
    case deliveriesRead = "deliveries.read"
    case deliveriesRetry = "deliveries.retry"
    case debugExplain = "debug.explain"
    case endpointsManage = "endpoints.manage"
    case templatesManage = "templates.manage"
    case jobsRead = "jobs.read"
    case jobsManage = "jobs.manage"

    /// What holding the permission allows, in one sentence.
    public var summary: String {
        switch self {
        case .organisationManage: "Change the organisation's name and settings."
        case .usersRead: "List and read users."
        case .usersManage: "Create, change, deactivate and reactivate users."
        case .rolesRead: "List and read roles."
        case .rolesManage: "Create, change and delete custom roles; assign roles to users."
        case .groupsRead: "List and read groups and their members."
        case .groupsManage: "Create, change and delete groups; add and remove members."
        case .apikeysManage: "Create, list and revoke API keys."
        case .auditRead: "Read the audit log."
        case .eventsSend: "Send and cancel events."
        case .eventsRead: "List and read events."
        case .statsRead: "Read notification statistics of any user or the whole organisation."
        case .notificationsRead: "Read one's own in-app feed."
        case .preferencesManage: "Edit one's own notification preferences."
        case .deliveriesRead: "Read delivery and digest status."
        case .deliveriesRetry: "Retry or cancel deliveries; retry digests."
        case .debugExplain: "Explain targeting decisions."
        case .endpointsManage: "Manage webhook and chat endpoints."
        case .templatesManage: "Manage categories, notification types and templates."
        case .jobsRead: "See the scheduled jobs and their run history."
        case .jobsManage: "Run a scheduled job now."
        }
    }

    public static func < (lhs: Permission, rhs: Permission) -> Bool { lhs.rawValue < rhs.rawValue }

    /// Permissions over one's own rows only (the feed, one's preferences). Holding them gives
    /// no power over anyone else, so they do not count when comparing who holds more.
    public var concernsOnlyTheHolder: Bool { self == .notificationsRead || self == .preferencesManage }
}

/// The roles every organisation starts with. They cannot be changed or deleted.
public enum BuiltinRole: String, CaseIterable, Sendable {
    case owner, admin, member, service

    public var name: String {
        switch self {
        case .owner: "Owner"
        case .admin: "Admin"
        case .member: "Member"
        case .service: "Service"
        }
    }

    public var summary: String {
        switch self {
        case .owner: "Everything, including the organisation's settings."
        case .admin: "Everything but the organisation's settings."
        case .member: "Reads their own feed and edits their own preferences."
        case .service:
            "An integrator's backend: sends events, manages users, groups and the catalogue, asks why someone was or was not told."
        }
    }

    public var permissions: Set<Permission> {
        switch self {
        case .owner:
            Set(Permission.allCases)
        case .admin:
            Set(Permission.allCases).subtracting([.organisationManage])
        case .member:
            [.notificationsRead, .preferencesManage]
        case .service:
            [
                .eventsSend, .eventsRead, .usersRead, .usersManage, .groupsRead, .groupsManage, .rolesRead,
                .templatesManage, .endpointsManage, .deliveriesRead, .statsRead, .debugExplain,
            ]
        }
    }
}
