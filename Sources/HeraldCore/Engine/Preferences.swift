import Foundation

/// One setting for a category on a channel, as a user or the organisation stores it.
public struct PreferenceSetting: Sendable, Equatable, Codable {
    public var enabled: Bool
    public var frequency: Frequency
    public var conditions: [Condition]
    /// Why Herald, not the user, switched this setting off (nil for the user's own settings).
    public var switchedOff: SwitchOff?

    public init(enabled: Bool, frequency: Frequency, conditions: [Condition] = [], switchedOff: SwitchOff? = nil) {
        self.enabled = enabled
        self.frequency = frequency
        self.conditions = conditions
        self.switchedOff = switchedOff
    }
}

/// Why Herald switched a user's preference off.
public enum SwitchOff: String, Sendable, Equatable, Codable {
    /// The organisation's inactivity rule: no engagement for its period and grace after a warning.
    case inactivity = "INACTIVITY"
}

/// The preference that applies, with where it came from.
public struct EffectivePreference: Sendable, Equatable, Codable {
    public var enabled: Bool
    public var frequency: Frequency
    public var conditions: [Condition]
    public var source: PreferenceSource
    /// Set when the user's setting is off because Herald switched it off.
    public var switchedOff: SwitchOff?

    public init(enabled: Bool, frequency: Frequency, conditions: [Condition], source: PreferenceSource, switchedOff: SwitchOff? = nil) {
        self.enabled = enabled
        self.frequency = frequency
        self.conditions = conditions
        self.source = source
        self.switchedOff = switchedOff
    }
}

/// Resolves the effective preference of one cell (user × category × channel).
///
/// Precedence, first match wins:
/// 1. a critical category on the in-app channel is always on, immediately (critical override);
/// 2. the user's own setting;
/// 3. the organisation's default for the category and channel;
/// 4. the type's default: on and immediate for its default channels, off elsewhere.
public enum PreferenceResolver {
    public static func resolve(
        channel: NotificationChannel,
        categoryIsCritical: Bool,
        typeDefaultChannels: Set<NotificationChannel>,
        user: PreferenceSetting?,
        organisationDefault: PreferenceSetting?
    ) -> EffectivePreference {
        if categoryIsCritical, channel.reach == .feed {
            return EffectivePreference(enabled: true, frequency: .immediate, conditions: [], source: .criticalOverride)
        }
        if let user {
            return EffectivePreference(
                enabled: user.enabled, frequency: user.frequency, conditions: user.conditions, source: .user,
                switchedOff: user.enabled ? nil : user.switchedOff)
        }
        if let organisationDefault {
            return EffectivePreference(
                enabled: organisationDefault.enabled, frequency: organisationDefault.frequency,
                conditions: organisationDefault.conditions, source: .organisationDefault)
        }
        let on = typeDefaultChannels.contains(channel)
        return EffectivePreference(enabled: on, frequency: on ? .immediate : .none, conditions: [], source: .typeDefault)
    }

    /// Resolution without a notification type (the "resolved preferences" view of a user): a
    /// category's default is on and immediate for in-app only.
    public static func resolve(
        channel: NotificationChannel, categoryIsCritical: Bool, user: PreferenceSetting?, organisationDefault: PreferenceSetting?
    ) -> EffectivePreference {
        resolve(
            channel: channel, categoryIsCritical: categoryIsCritical, typeDefaultChannels: [.inApp], user: user,
            organisationDefault: organisationDefault)
    }
}

/// What the engine decided for one recipient on one channel, and why.
public struct ChannelDecision: Sendable, Equatable, Codable {
    public var channel: NotificationChannel
    public var preference: EffectivePreference
    public var outcome: ChannelOutcome
    public var reason: ReasonCode
    /// For `CONDITION_NOT_MET`: the index in `preference.conditions` of the first condition
    /// the event or its recipient did not meet.
    public var failedCondition: Int?

    public init(
        channel: NotificationChannel, preference: EffectivePreference, outcome: ChannelOutcome, reason: ReasonCode,
        failedCondition: Int? = nil
    ) {
        self.channel = channel
        self.preference = preference
        self.outcome = outcome
        self.reason = reason
        self.failedCondition = failedCondition
    }
}

/// Decides each channel for one targeted recipient. Pure: the caller supplies the
/// preferences, whether the user is throttled, and which channels have somewhere to go.
public enum ChannelDecider {
    public static func decide(
        channel: NotificationChannel,
        preference: EffectivePreference,
        payload: JSONValue,
        timeZone: TimeZone,
        throttled: Bool,
        hasDestination: Bool
    ) -> ChannelDecision {
        decide(
            channel: channel, preference: preference, subject: ConditionSubject(payload: payload, timeZone: timeZone),
            throttled: throttled, hasDestination: hasDestination)
    }

    /// The decision for the event and recipient of `subject` (conditions may test the event's
    /// type and the recipient's attributes as well as the payload).
    public static func decide(
        channel: NotificationChannel,
        preference: EffectivePreference,
        subject: ConditionSubject,
        throttled: Bool,
        hasDestination: Bool
    ) -> ChannelDecision {
        func skip(_ reason: ReasonCode) -> ChannelDecision {
            ChannelDecision(channel: channel, preference: preference, outcome: .skipped, reason: reason)
        }
        guard preference.enabled else { return skip(preference.switchedOff == .inactivity ? .switchedOffInactive : .channelDisabled) }
        guard preference.frequency != .none else { return skip(.frequencyNone) }
        if let failed = preference.conditions.firstIndex(where: { !$0.isMet(by: subject) }) {
            return ChannelDecision(
                channel: channel, preference: preference, outcome: .skipped, reason: .conditionNotMet, failedCondition: failed)
        }
        // A critical override is never throttled: a critical alert always reaches the bell.
        if throttled, preference.source != .criticalOverride { return skip(.throttled) }
        guard hasDestination else { return skip(.noDestination) }
        if channel.reach == .feed {
            return ChannelDecision(channel: channel, preference: preference, outcome: .inApp, reason: .inAppCreated)
        }
        // Digests go by email only; a webhook or chat channel set to DAILY or WEEKLY is sent at
        // once, as in-app ignores them, never held for a digest that would not gather it.
        switch preference.frequency {
        case .daily where channel == .email, .weekly where channel == .email:
            return ChannelDecision(channel: channel, preference: preference, outcome: .digest, reason: .digestQueued)
        default:
            return ChannelDecision(channel: channel, preference: preference, outcome: .immediate, reason: .deliveryQueued)
        }
    }
}
