import Foundation

/// Where a notification can go.
public enum NotificationChannel: String, CaseIterable, Sendable, Codable, Comparable {
    case inApp = "in_app"
    case email
    case webhook
    case chat

    public static func < (lhs: NotificationChannel, rhs: NotificationChannel) -> Bool {
        allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)!
    }
}

/// How often a recipient hears about a category on a channel.
public enum Frequency: String, CaseIterable, Sendable, Codable {
    case immediate = "IMMEDIATE"
    case daily = "DAILY"
    case weekly = "WEEKLY"
    case none = "NONE"
}

/// How serious an event is.
public enum Severity: String, CaseIterable, Sendable, Codable {
    case info = "INFO"
    case warning = "WARNING"
    case critical = "CRITICAL"
}

/// How urgent an event is.
public enum Priority: String, CaseIterable, Sendable, Codable {
    case low, normal, high, critical

    /// A high or critical event's deliveries are claimed before the organisation's others that
    /// are due (migration 0062); low and normal share one lane.
    public var isUrgent: Bool { self == .high || self == .critical }
}

/// Where an effective preference came from.
public enum PreferenceSource: String, CaseIterable, Sendable, Codable {
    /// The user's own setting.
    case user
    /// The organisation's default for the category and channel.
    case organisationDefault = "organisation_default"
    /// The notification type's default channels.
    case typeDefault = "type_default"
    /// A critical category is always shown in-app, whatever the settings say.
    case criticalOverride = "critical_override"
}

/// Every reason the engine can give for what it did. Stable strings: clients and
/// `docs/reason-codes.md` rely on them.
public enum ReasonCode: String, CaseIterable, Sendable, Codable {
    // Targeting
    case targetedUser = "TARGETED_USER"
    case targetedRole = "TARGETED_ROLE"
    case targetedGroup = "TARGETED_GROUP"
    case targetedEveryone = "TARGETED_EVERYONE"
    case excluded = "EXCLUDED"
    case userInactive = "USER_INACTIVE"
    // NotificationChannel decisions
    case inAppCreated = "IN_APP_CREATED"
    case deliveryQueued = "DELIVERY_QUEUED"
    case heldForQuietHours = "HELD_QUIET_HOURS"
    case digestQueued = "DIGEST_QUEUED"
    case channelDisabled = "CHANNEL_DISABLED"
    case switchedOffInactive = "SWITCHED_OFF_INACTIVE"
    case frequencyNone = "FREQUENCY_NONE"
    case expiresInQuietHours = "EXPIRES_IN_QUIET_HOURS"
    case conditionNotMet = "CONDITION_NOT_MET"
    case throttled = "THROTTLED"
    case noDestination = "NO_DESTINATION"

    /// The reason in a sentence an admin can read.
    public var sentence: String {
        switch self {
        case .targetedUser: "The event named this user."
        case .targetedRole: "The user holds a role the event targets."
        case .targetedGroup: "The user is a member of a group the event targets."
        case .targetedEveryone: "The event targets everyone in the organisation."
        case .excluded: "The event excluded this user."
        case .userInactive: "The user is deactivated; deactivated users receive nothing."
        case .inAppCreated: "An in-app notification was created."
        case .deliveryQueued: "A delivery was queued for immediate sending."
        case .heldForQuietHours:
            "A delivery was queued to be sent when the user's quiet hours end (the event came during them, and neither its category nor its priority is critical)."
        case .digestQueued: "The event was added to the user's next digest."
        case .channelDisabled: "This channel is off for this category: by a preference, or, with none, by the type's default channels."
        case .switchedOffInactive:
            "Herald switched this email subscription off: the user did not engage for the organisation's inactivity period, nor after the warning. The user can switch it on again."
        case .frequencyNone: "The preference's frequency is NONE."
        case .expiresInQuietHours:
            "The event came during the user's quiet hours and expires before they end: no email was queued (it would have gone out expired)."
        case .conditionNotMet: "A condition of the preference is not met by the event or its recipient."
        case .throttled:
            "The user already received the most notifications allowed in a minute (the organisation's limit per category or per user)."
        case .noDestination:
            "No enabled endpoint of this channel takes this notification type (none is configured, or none lists the type in its event_types)."
        }
    }
}

/// What the engine decided for one recipient on one channel.
public enum ChannelOutcome: String, Sendable, Codable {
    case inApp = "IN_APP"
    case immediate = "IMMEDIATE"
    case digest = "DIGEST"
    case skipped = "SKIPPED"
}
