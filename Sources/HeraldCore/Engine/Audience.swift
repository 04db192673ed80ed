import Foundation

/// Who an event is for: any mix of users, roles, groups or everyone, minus exclusions.
public struct Audience: Sendable, Equatable, Codable {
    public var userIDs: [UUID]
    public var roleKeys: [String]
    public var groupKeys: [String]
    public var everyone: Bool
    public var excludeUserIDs: [UUID]

    public init(
        userIDs: [UUID] = [], roleKeys: [String] = [], groupKeys: [String] = [], everyone: Bool = false, excludeUserIDs: [UUID] = []
    ) {
        self.userIDs = userIDs
        self.roleKeys = roleKeys
        self.groupKeys = groupKeys
        self.everyone = everyone
        self.excludeUserIDs = excludeUserIDs
    }

    public var isEmpty: Bool { userIDs.isEmpty && roleKeys.isEmpty && groupKeys.isEmpty && !everyone }
}

/// A user the store found for an audience, with how they matched.
public struct Candidate: Sendable, Equatable {
    public var userID: UUID
    public var active: Bool
    /// Matched by explicit id, by role, by group, or as part of everyone.
    public var byUser: Bool
    public var byRoles: [String]
    public var byGroups: [String]
    public var byEveryone: Bool

    public init(userID: UUID, active: Bool, byUser: Bool = false, byRoles: [String] = [], byGroups: [String] = [], byEveryone: Bool = false)
    {
        self.userID = userID
        self.active = active
        self.byUser = byUser
        self.byRoles = byRoles
        self.byGroups = byGroups
        self.byEveryone = byEveryone
    }
}

/// Whether a user is targeted, and by which rule.
public struct TargetingDecision: Sendable, Equatable, Codable {
    public var userID: UUID
    public var targeted: Bool
    /// The rule that matched: `user`, `role:<key>`, `group:<key>` or `everyone`.
    public var rule: String
    public var reason: ReasonCode

    public init(userID: UUID, targeted: Bool, rule: String, reason: ReasonCode) {
        self.userID = userID
        self.targeted = targeted
        self.rule = rule
        self.reason = reason
    }
}

/// Turns candidates into targeting decisions: exclusions and inactive users are considered
/// and not targeted, each with its reason; the most specific matching rule is reported.
public enum AudienceResolver {
    public static func decide(_ candidates: [Candidate], excluding excluded: Set<UUID>) -> [TargetingDecision] {
        candidates.map { candidate in
            let (rule, reason): (String, ReasonCode) =
                if candidate.byUser { ("user", .targetedUser) } else if let role = candidate.byRoles.sorted().first {
                    ("role:\(role)", .targetedRole)
                } else if let group = candidate.byGroups.sorted().first { ("group:\(group)", .targetedGroup) } else {
                    ("everyone", .targetedEveryone)
                }
            if excluded.contains(candidate.userID) {
                return TargetingDecision(userID: candidate.userID, targeted: false, rule: rule, reason: .excluded)
            }
            guard candidate.active else {
                return TargetingDecision(userID: candidate.userID, targeted: false, rule: rule, reason: .userInactive)
            }
            return TargetingDecision(userID: candidate.userID, targeted: true, rule: rule, reason: reason)
        }
    }
}
