import HeraldCore

/// What an operation needs from the caller.
enum AccessRule: Sendable, Equatable {
    /// No credential at all (health, login, JWKS).
    case `public`
    /// Any valid credential of the organisation.
    case authenticated
    /// A credential holding this permission.
    case permission(Permission)
}

/// Operation → the rule it needs. Every operation in `openapi.yaml` has exactly one entry
/// (a test checks it against the spec's `x-permission`); an operation missing here is refused.
///
/// | operation | rule |
/// |---|---|
/// | getHealth, getReadiness, getMetrics, getJWKS, createToken, refreshToken, logout | public |
/// | followLink, showUnsubscribe, unsubscribe, showKeepSubscribed, keepSubscribed (the signed token is the credential) | public |
/// | list/create/get/update/deleteEndpoint, rotateEndpointSecret | endpoints.manage |
/// | getMe, changeMyPassword, listPermissions, getOrganisation | authenticated |
/// | updateOrganisation | organisation.manage |
/// | listUsers, getUser | users.read |
/// | createUser, importUsers (and groups.manage with group_ids), updateUser, setUserPassword, createUserSession, deleteUser, deactivateUser, reactivateUser | users.manage |
/// | listRoles, getRole | roles.read |
/// | createRole, updateRole, deleteRole, setUserRoles | roles.manage |
/// | listGroups, getGroup, listGroupMembers | groups.read |
/// | createGroup, updateGroup, deleteGroup, addGroupMember, removeGroupMember | groups.manage |
/// | listApiKeys, createApiKey, getApiKey, revokeApiKey | apikeys.manage |
/// | listAuditEntries | audit.read |
/// | listCategories, getCategory | authenticated |
/// | create/update/deleteCategory, list/get/create/update/deleteNotificationType, put/deleteTemplate, export/importCatalogue | templates.manage (import with preference_defaults: also organisation.manage) |
/// | listDigestTemplates, getDigestTemplate, putDigestTemplate, deleteDigestTemplate, previewTemplate | templates.manage |
/// | get/replacePreferenceDefaults | organisation.manage |
/// | getMyPreferences, replaceMyPreferences, updateMyPreferences, getMyResolvedPreferences, updateMe | preferences.manage |
/// | getUserPreferences, replaceUserPreferences, updateUserPreferences, getUserResolvedPreferences | users.manage |
/// | sendEvent, cancelEvent | events.send |
/// | listEvents, getEvent | events.read |
/// | dryRunEvent, explainEvent, debugNotifications | debug.explain |
/// | getNotificationStats | stats.read |
/// | every /v1/me/notifications operation | notifications.read |
/// | listDeliveries, getDeliveryStats, getDelivery, listUserDigests | deliveries.read |
/// | retryDelivery, retryDeliveries, cancelDelivery, retryDigestRun | deliveries.retry |
/// | listSchedules, getSchedule | events.read |
/// | createSchedule, updateSchedule, deleteSchedule, pauseSchedule, resumeSchedule, runSchedule | events.send |
/// | listJobs, getJob, listJobRuns | jobs.read |
/// | runJob | jobs.manage |
enum RoutePermissions {
    /// Public operations whose credential is a signed link in the path (`{token}`), and the
    /// scope the link must carry; `TenantBoundary` opens their transaction.
    static let signedLinks: [String: LinkScope] = [
        "followLink": .click,
        "showUnsubscribe": .unsubscribe,
        "unsubscribe": .unsubscribe,
        "showKeepSubscribed": .keep,
        "keepSubscribed": .keep,
    ]

    /// The caller's own feed (`/v1/me/notifications…`): its transaction is confined to the
    /// caller's in-app rows, and an API key (no user) is refused.
    static func isOwnFeed(_ operationID: String) -> Bool {
        SpecRoutes.byOperationID[operationID]?.path.hasPrefix("/v1/me/notifications") ?? false
    }

    static let table: [String: AccessRule] = [
        "getHealth": .public,
        "getReadiness": .public,
        "getMetrics": .public,
        "getJWKS": .public,
        "createToken": .public,
        "refreshToken": .public,
        "logout": .public,
        "followLink": .public,
        "showUnsubscribe": .public,
        "unsubscribe": .public,
        "showKeepSubscribed": .public,
        "keepSubscribed": .public,
        "listEndpoints": .permission(.endpointsManage),
        "createEndpoint": .permission(.endpointsManage),
        "getEndpoint": .permission(.endpointsManage),
        "updateEndpoint": .permission(.endpointsManage),
        "deleteEndpoint": .permission(.endpointsManage),
        "rotateEndpointSecret": .permission(.endpointsManage),
        "getMe": .authenticated,
        "changeMyPassword": .authenticated,
        "updateMe": .permission(.preferencesManage),
        "listPermissions": .authenticated,
        "getOrganisation": .authenticated,
        "updateOrganisation": .permission(.organisationManage),
        "listUsers": .permission(.usersRead),
        "getUser": .permission(.usersRead),
        "createUser": .permission(.usersManage),
        "importUsers": .permission(.usersManage),
        "updateUser": .permission(.usersManage),
        "setUserPassword": .permission(.usersManage),
        "createUserSession": .permission(.usersManage),
        "deactivateUser": .permission(.usersManage),
        "deleteUser": .permission(.usersManage),
        "reactivateUser": .permission(.usersManage),
        "setUserRoles": .permission(.rolesManage),
        "listRoles": .permission(.rolesRead),
        "getRole": .permission(.rolesRead),
        "createRole": .permission(.rolesManage),
        "updateRole": .permission(.rolesManage),
        "deleteRole": .permission(.rolesManage),
        "listGroups": .permission(.groupsRead),
        "getGroup": .permission(.groupsRead),
        "listGroupMembers": .permission(.groupsRead),
        "createGroup": .permission(.groupsManage),
        "updateGroup": .permission(.groupsManage),
        "deleteGroup": .permission(.groupsManage),
        "addGroupMember": .permission(.groupsManage),
        "removeGroupMember": .permission(.groupsManage),
        "listApiKeys": .permission(.apikeysManage),
        "createApiKey": .permission(.apikeysManage),
        "getApiKey": .permission(.apikeysManage),
        "revokeApiKey": .permission(.apikeysManage),
        "listAuditEntries": .permission(.auditRead),
        "listCategories": .authenticated,
        "getCategory": .authenticated,
        "createCategory": .permission(.templatesManage),
        "updateCategory": .permission(.templatesManage),
        "deleteCategory": .permission(.templatesManage),
        "listNotificationTypes": .permission(.templatesManage),
        "getNotificationType": .permission(.templatesManage),
        "createNotificationType": .permission(.templatesManage),
        "updateNotificationType": .permission(.templatesManage),
        "deleteNotificationType": .permission(.templatesManage),
        "putTemplate": .permission(.templatesManage),
        "deleteTemplate": .permission(.templatesManage),
        "exportCatalogue": .permission(.templatesManage),
        "listDigestTemplates": .permission(.templatesManage),
        "getDigestTemplate": .permission(.templatesManage),
        "previewTemplate": .permission(.templatesManage),
        "putDigestTemplate": .permission(.templatesManage),
        "deleteDigestTemplate": .permission(.templatesManage),
        "importCatalogue": .permission(.templatesManage),
        "getPreferenceDefaults": .permission(.organisationManage),
        "replacePreferenceDefaults": .permission(.organisationManage),
        "getMyPreferences": .permission(.preferencesManage),
        "replaceMyPreferences": .permission(.preferencesManage),
        "updateMyPreferences": .permission(.preferencesManage),
        "getMyResolvedPreferences": .permission(.preferencesManage),
        "getUserPreferences": .permission(.usersManage),
        "replaceUserPreferences": .permission(.usersManage),
        "updateUserPreferences": .permission(.usersManage),
        "getUserResolvedPreferences": .permission(.usersManage),
        "sendEvent": .permission(.eventsSend),
        "listEvents": .permission(.eventsRead),
        "getEvent": .permission(.eventsRead),
        "cancelEvent": .permission(.eventsSend),
        "dryRunEvent": .permission(.debugExplain),
        "explainEvent": .permission(.debugExplain),
        "debugNotifications": .permission(.debugExplain),
        "getNotificationStats": .permission(.statsRead),
        "listMyNotifications": .permission(.notificationsRead),
        "clearMyNotifications": .permission(.notificationsRead),
        "getMyUnreadCount": .permission(.notificationsRead),
        "markNotificationsRead": .permission(.notificationsRead),
        "getMyNotificationStats": .permission(.notificationsRead),
        "getMyNotification": .permission(.notificationsRead),
        "deleteMyNotification": .permission(.notificationsRead),
        "markNotificationRead": .permission(.notificationsRead),
        "markNotificationUnread": .permission(.notificationsRead),
        "archiveNotification": .permission(.notificationsRead),
        "createStreamTicket": .permission(.notificationsRead),
        // Hand-written routes (StreamRoutes): they check the same permission themselves.
        "streamMyNotifications": .permission(.notificationsRead),
        "openMyNotificationSocket": .permission(.notificationsRead),
        "listDeliveries": .permission(.deliveriesRead),
        "getDeliveryStats": .permission(.deliveriesRead),
        "getDelivery": .permission(.deliveriesRead),
        "retryDelivery": .permission(.deliveriesRetry),
        "retryDeliveries": .permission(.deliveriesRetry),
        "cancelDelivery": .permission(.deliveriesRetry),
        "listUserDigests": .permission(.deliveriesRead),
        "retryDigestRun": .permission(.deliveriesRetry),
        "listSchedules": .permission(.eventsRead),
        "getSchedule": .permission(.eventsRead),
        "createSchedule": .permission(.eventsSend),
        "deleteSchedule": .permission(.eventsSend),
        "pauseSchedule": .permission(.eventsSend),
        "updateSchedule": .permission(.eventsSend),
        "resumeSchedule": .permission(.eventsSend),
        "runSchedule": .permission(.eventsSend),
        "listJobs": .permission(.jobsRead),
        "getJob": .permission(.jobsRead),
        "listJobRuns": .permission(.jobsRead),
        "runJob": .permission(.jobsManage),
    ]
}
