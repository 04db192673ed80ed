import Foundation
import HeraldCore
import PostgresNIO

/// One stored preference cell: a category on a channel.
public struct PreferenceCell: Sendable, Equatable {
    public var categoryID: UUID
    public var channel: NotificationChannel
    public var setting: PreferenceSetting

    public init(categoryID: UUID, channel: NotificationChannel, setting: PreferenceSetting) {
        self.categoryID = categoryID
        self.channel = channel
        self.setting = setting
    }
}

extension TenantTransaction {
    /// The user's own settings (cells not listed inherit).
    public func preferences(ofUser userID: UUID) async throws -> [PreferenceCell] {
        try await query(
            "SELECT category_id, channel, enabled, frequency, conditions, switched_off FROM preferences WHERE organisation_id = \(organisationID) AND user_id = \(userID) ORDER BY category_id, channel"
        ).map(decodeCell)
    }

    /// Replaces the user's settings with `cells` (a cell not listed inherits again).
    public func replacePreferences(ofUser userID: UUID, with cells: [PreferenceCell]) async throws {
        try await query("DELETE FROM preferences WHERE organisation_id = \(organisationID) AND user_id = \(userID)")
        guard !cells.isEmpty else { return }
        try await query(
            """
            INSERT INTO preferences (organisation_id, user_id, category_id, channel, enabled, frequency, conditions)
            SELECT \(organisationID), \(userID), c, ch, e, f, cond
            FROM unnest(\(cells.map(\.categoryID))::uuid[], \(cells.map(\.channel))::text[], \(cells.map(\.setting.enabled))::boolean[],
                        \(cells.map(\.setting.frequency))::text[], \(cells.map { JSONDocument($0.setting.conditions) })::jsonb[])
                 AS cell(c, ch, e, f, cond)
            """)
    }

    /// The organisation's defaults.
    public func preferenceDefaults() async throws -> [PreferenceCell] {
        try await read(preferenceDefaultsRead())
    }

    /// `preferenceDefaults` as a read that can go out with others.
    func preferenceDefaultsRead() -> StoreRead<[PreferenceCell]> {
        StoreRead(
            statement:
                "SELECT category_id, channel, enabled, frequency, conditions, NULL::text FROM preference_defaults WHERE organisation_id = \(organisationID) ORDER BY category_id, channel",
            decode: { try $0.map(decodeCell) })
    }

    /// Replaces the organisation's defaults with `cells`.
    public func replacePreferenceDefaults(with cells: [PreferenceCell]) async throws {
        try await query("DELETE FROM preference_defaults WHERE organisation_id = \(organisationID)")
        guard !cells.isEmpty else { return }
        try await query(
            """
            INSERT INTO preference_defaults (organisation_id, category_id, channel, enabled, frequency, conditions)
            SELECT \(organisationID), c, ch, e, f, cond
            FROM unnest(\(cells.map(\.categoryID))::uuid[], \(cells.map(\.channel))::text[], \(cells.map(\.setting.enabled))::boolean[],
                        \(cells.map(\.setting.frequency))::text[], \(cells.map { JSONDocument($0.setting.conditions) })::jsonb[])
                 AS cell(c, ch, e, f, cond)
            """)
    }
}

/// A stored cell. A channel or frequency Herald does not know fails the read (a logged 500)
/// rather than dropping the cell: a dropped opt-out would answer something false.
private func decodeCell(_ row: PostgresRow) throws -> PreferenceCell {
    let (category, channel, enabled, frequency, conditions, switchedOff) =
        try row.decode((UUID, NotificationChannel, Bool, Frequency, JSONDocument<[Condition]>, String?).self, table: "preferences")
    return PreferenceCell(
        categoryID: category, channel: channel,
        setting: PreferenceSetting(
            enabled: enabled, frequency: frequency, conditions: conditions.value, switchedOff: switchedOff.flatMap(SwitchOff.init)))
}
