import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func getOrganisation(_ input: Operations.GetOrganisation.Input) async throws -> Operations.GetOrganisation.Output {
        let organisation = try await tenant { tx, _ in
            Components.Schemas.Organisation(try await tx.organisation(), limits: try await tx.rateLimitSettings(), instance: rateLimits)
        }
        return .ok(.init(body: .json(organisation)))
    }

    func updateOrganisation(_ input: Operations.UpdateOrganisation.Input) async throws -> Operations.UpdateOrganisation.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let name = try body.name.map { name in try Validate.text(name, field: "name") }
        let locale = try body.defaultLocale.map { v in try Validate.locale(v, field: "default_locale") }
        if let throttle = body.throttlePerMinute, !(0...100_000).contains(throttle) {
            throw APIError.unprocessable(ValidationError(field: "throttle_per_minute", message: "must be between 0 (off) and 100000."))
        }
        if let throttle = body.userThrottlePerMinute, !(0...100_000).contains(throttle) {
            throw APIError.unprocessable(ValidationError(field: "user_throttle_per_minute", message: "must be between 0 (off) and 100000."))
        }
        let timezone = try body.defaultTimezone.map { v in try Validate.timezone(v, field: "default_timezone") }
        if let hour = body.digestHour, !(0...23).contains(hour) {
            throw APIError.unprocessable(ValidationError(field: "digest_hour", message: "must be an hour of the day, 0 to 23."))
        }
        if let weekday = body.digestWeekday, !(1...7).contains(weekday) {
            throw APIError.unprocessable(
                ValidationError(field: "digest_weekday", message: "must be an ISO weekday, 1 (Monday) to 7 (Sunday)."))
        }
        if let days = body.inactivityDays, !(7...3650).contains(days) {
            throw APIError.unprocessable(ValidationError(field: "inactivity_days", message: "must be 7 to 3650 days."))
        }
        if let days = body.inactivityGraceDays, !(1...365).contains(days) {
            throw APIError.unprocessable(ValidationError(field: "inactivity_grace_days", message: "must be 1 to 365 days."))
        }
        if let days = body.retentionDays, !(1...3650).contains(days) {
            throw APIError.unprocessable(ValidationError(field: "retention_days", message: "must be 1 to 3650 days."))
        }
        let (from, replyTo) = (
            try body.emailFrom.map { v throws(ValidationError) in v.isEmpty ? v : try Validate.emailAddress(v, field: "email_from") },
            try body.emailReplyTo.map { v throws(ValidationError) in v.isEmpty ? v : try Validate.emailAddress(v, field: "email_reply_to") }
        )
        let fromName = try body.emailFromName.map { v in v.isEmpty ? v : try Validate.text(v, field: "email_from_name") }
        let updated = try await tenant { tx, _ in
            let limits = try await tx.rateLimitSettings()
            let before = Components.Schemas.Organisation(try await tx.organisation(), limits: limits, instance: rateLimits)
            if let throttle = body.throttlePerMinute { try await tx.setThrottle(perMinute: throttle) }
            if let throttle = body.userThrottlePerMinute { try await tx.setUserThrottle(perMinute: throttle) }
            if from != nil || fromName != nil || replyTo != nil {
                try await tx.setEmailIdentity(from: from, fromName: fromName, replyTo: replyTo)
            }
            let after = Components.Schemas.Organisation(
                try await tx.updateOrganisation(
                    name: name, defaultLocale: locale, defaultTimezone: timezone, digestHour: body.digestHour,
                    digestWeekday: body.digestWeekday, retentionDays: body.retentionDays,
                    inactivity: InactivityChange(
                        enabled: body.inactivityEnabled, days: body.inactivityDays, graceDays: body.inactivityGraceDays)),
                limits: limits, instance: rateLimits)
            // A new digest hour, weekday or time zone: what waits goes out once, at the new time.
            if body.digestHour != nil || body.digestWeekday != nil || timezone != nil {
                try await tx.reslotWaitingDigestItems(of: nil, now: now())
            }
            try await tx.audit(
                action: "organisation.update", targetType: "organisation", targetID: after.id,
                before: try auditValue(before), after: try auditValue(after))
            return after
        }
        return .ok(.init(body: .json(updated)))
    }
}
