# The verification gateway is a SOAP 1.1 service: one envelope per OkHi v3
# event. The output is a string, so the relay sends those bytes as they are,
# with the target's content_type (text/xml).
#
# @html escapes <, >, &, ' and " in every interpolated value, which is what
# XML text needs: a payload cannot add an element. A missing field is an
# empty element rather than the text "null".
.data as $d
| @html "<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:v=\"urn:example:address-verification\">
  <soap:Body>
    <v:AddressVerified>
      <v:EventId>\(.event_id // "")</v:EventId>
      <v:VerificationId>\($d.address_verification.id // "")</v:VerificationId>
      <v:Status>\($d.address_verification.status // "")</v:Status>
      <v:LocationId>\($d.location.id // "")</v:LocationId>
      <v:Address>\($d.location.formatted_address // "")</v:Address>
      <v:CustomerId>\($d.user.id // "")</v:CustomerId>
    </v:AddressVerified>
  </soap:Body>
</soap:Envelope>
"
