"""Another program's rules (a firewall chain and a NAT chain, jumped to from the built-in
chains iptsync also uses), restored before a test to check iptsync leaves them alone."""

FOREIGN = """*filter
:MY-FIREWALL - [0:0]
-A INPUT -s 192.0.2.0/24 -j MY-FIREWALL
-A MY-FIREWALL -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -j MY-FIREWALL
-A OUTPUT -d 192.0.2.9/32 -j DROP
COMMIT
*nat
:MY-NAT - [0:0]
-A PREROUTING -d 192.0.2.1/32 -j MY-NAT
-A MY-NAT -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.0.2.2:80
-A POSTROUTING -o lo -j RETURN
COMMIT
"""
